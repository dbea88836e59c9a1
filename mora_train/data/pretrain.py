"""Continual pretraining on raw domain text (task=biomed, task=finance): packed blocks + domain benchmarks.

Training text comes from a record field (`task.data.fields.text`: a field or a template such as
"{title}\\n{abstract}") or from .txt files (field `text`). Each document is tokenized, followed by
EOS, and the documents are cut into blocks of exactly `max_seq_len` tokens (data/corpus.py: read, tokenized in
`task.num_proc` processes and packed by 🤗 datasets, kept in its cache; or, `task.data.streaming=true`, streamed as
training reads it). Weighted sources (`weight`) are mixed by `datasets.interleave_datasets`.

Cross-document attention: each block carries `position_ids` that restart at 0 where a document
starts (and at the block start), and no attention mask. transformers (>= 4.53, models built on
its masking utilities: Llama-family such as SmolLM2, Qwen2, Mistral, ...) reads restarting
positions as packed sequences and builds a block-diagonal causal mask, so a document never
attends to the one before it (tests/unit/test_pretrain_data.py checks this against unpacked
forwards, sdpa and eager attention). A model that does not use those utilities (some remote-code models) attends
across documents inside a block; either way the label of each document's first token is masked,
so no loss term predicts one document from another.

Evaluation data: held-out text packed the same way (for perplexity, evaluation/pretrain.py), and the
zero-shot multiple-choice benchmarks' records (data/benchmarks.py; scored by evaluation/multiple_choice.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.data.benchmarks import MCExample, load_benchmark
from mora_train.data.cache import tokenizer_fingerprint
from mora_train.data.config import BenchmarkSettings, DataRecipe, TaskData, source_problems
from mora_train.data.corpus import TextStream, packed_blocks, stream_blocks
from mora_train.data.prepare import Examples

log = logging.getLogger(__name__)


@dataclass
class PretrainData:
    train: Sequence[dict] | TextStream  # packed blocks (Arrow-backed), or a stream of them
    eval_blocks: Sequence[dict]  # held-out text, packed like the training text
    benchmarks: dict[str, list[MCExample]]
    stats: dict[str, Any] = field(default_factory=dict)


class PretrainTaskData(TaskData):
    fields: dict[str, str | None] = setting(
        factory=lambda: {"text": "text"},
        help='recipe field text -> your field: a name, a dotted path or a template ("{title}\\n{abstract}")',
    )
    streaming: bool = setting(
        default=False,
        help="read the training text as a stream (datasets' IterableDataset): the same memory whatever its size, "
        "tokenized as training reads it; needs trainer.max_steps",
    )

    def required_fields(self) -> tuple[str, ...]:
        return ("text",)


class PretrainRecipe(DataRecipe):
    """Raw text packed into blocks (task=pretrain, biomed, finance; tasks/pretrain.py adds the evaluation settings)."""

    data: PretrainTaskData = setting(help="the training and held-out text and the field mapping")
    benchmarks: dict[str, BenchmarkSettings] = setting(
        factory=dict, help="zero-shot multiple-choice benchmarks by name (task.eval.benchmarks picks which run)"
    )

    def check(self, prefix: str) -> list[str]:
        problems = super().check(prefix)
        if self.data.streaming and self.num_proc is not None and self.num_proc > 1:
            problems.append(
                f"`{prefix}.num_proc={self.num_proc}` tokenizes map-style data ahead of training, but "
                f"`{prefix}.data.streaming=true` tokenizes the stream in the training process as it is read; "
                f"unset {prefix}.num_proc or set {prefix}.data.streaming=false"
            )
        return problems

    def streams(self) -> bool:
        return self.data.streaming

    def selected_benchmarks(self, selected: list[str] | None) -> list[str]:
        """The benchmarks that run: `selected` (task.eval.benchmarks), or all of them when it is None."""
        return list(self.benchmarks) if selected is None else selected

    def selection_problems(self, selected: list[str] | None, prefix: str, selected_key: str) -> list[str]:
        """Every selected benchmark must exist, and its data be readable (only those that run are checked)."""
        problems = []
        for name in self.selected_benchmarks(selected):
            if name not in self.benchmarks:
                problems.append(
                    f"`{selected_key}` names '{name}', which is not in {prefix}.benchmarks "
                    f"({', '.join(self.benchmarks)})"
                )
            else:
                problems += source_problems(self.benchmarks[name].data, f"{prefix}.benchmarks.{name}.data")
        return problems


def document_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one document, ending with EOS (BOS too if the tokenizer adds one by default)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def packed(
    settings: PretrainRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, part: str, limit: int | None
) -> tuple[Examples, dict]:
    """The `part` text (train or eval; its first `limit` documents) packed into max_seq_len blocks, cached."""
    train = part == "train"
    blocks, meta = packed_blocks(
        settings.data.train if train else settings.data.eval,
        f"task.data.{part}",
        tokenizer_fingerprint(tokenizer),
        tokenizer,
        fields=settings.data.fields,
        block_size=max_seq_len,
        limit=limit,
        cache_dir=settings.cache_dir,
        num_proc=settings.num_proc,
        mixing=(settings.data.mixing_stop, settings.data.mixing_seed) if train else None,
    )
    log.info(
        "%s %s text: %d documents, %d tokens -> %d blocks of %d tokens",
        settings.name,
        part,
        meta["documents"],
        meta["tokens"],
        meta["blocks"],
        max_seq_len,
    )
    return blocks, meta


def streamed(settings: PretrainRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> TextStream:
    """The training text as a stream of max_seq_len blocks (task.data.streaming=true)."""
    log.info(
        "%s training text: streamed, packed into blocks of %d tokens as training reads it", settings.name, max_seq_len
    )
    return stream_blocks(
        settings.data.train,
        "task.data.train",
        tokenizer,
        fields=settings.data.fields,
        block_size=max_seq_len,
        cache_dir=settings.cache_dir,
        mixing=(settings.data.mixing_stop, settings.data.mixing_seed),
    )


def _benchmarks(settings: PretrainRecipe, selected: list[str] | None) -> dict[str, list[MCExample]]:
    return {
        name: load_benchmark(settings.benchmarks[name], f"task.benchmarks.{name}")
        for name in settings.selected_benchmarks(selected)
    }


def build(
    settings: PretrainRecipe,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    eval_limit: int | None,
    benchmarks: list[str] | None,
) -> PretrainData:
    """Packed training and held-out text (its first `eval_limit` documents), and the records of the selected
    `benchmarks` (None: all; task.eval.max_samples and task.eval.benchmarks)."""
    records = _benchmarks(settings, benchmarks)  # first: bad benchmark data fails before any training
    eval_blocks, eval_meta = packed(settings, tokenizer, max_seq_len, "eval", eval_limit)
    if settings.data.streaming:
        stream = streamed(settings, tokenizer, max_seq_len)
        return PretrainData(stream, eval_blocks, records, {"streaming": True, "eval_documents": eval_meta["documents"]})
    train, meta = packed(settings, tokenizer, max_seq_len, "train", None)
    return PretrainData(train, eval_blocks, records, {**meta, "eval_documents": eval_meta["documents"]})


def build_eval(
    settings: PretrainRecipe,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    eval_limit: int | None,
    benchmarks: list[str] | None,
) -> PretrainData:
    records = _benchmarks(settings, benchmarks)
    eval_blocks, _ = packed(settings, tokenizer, max_seq_len, "eval", eval_limit)
    return PretrainData([], eval_blocks, records)

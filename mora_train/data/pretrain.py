"""Continual pretraining on raw domain text (task=biomed, task=finance): packed blocks + domain benchmarks.

Training text comes from a record field (`task.data.fields.text`: a field or a template such as
"{title}\\n{abstract}") or from .txt files (field `text`). Each document is tokenized, followed by
EOS, and the stream is cut into blocks of exactly `max_seq_len` tokens (the last one may be shorter).

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.core.errors import MoraTrainError
from mora_train.data.benchmarks import MCExample, load_benchmark
from mora_train.data.cache import cached, tokenizer_fingerprint
from mora_train.data.common import IGNORE_INDEX
from mora_train.data.config import BenchmarkSettings, DataRecipe, TaskData, source_problems
from mora_train.data.sources import as_text, fingerprint_sources, load_records, map_fields

log = logging.getLogger(__name__)


@dataclass
class PretrainData:
    train: list[dict]
    eval_blocks: list[dict]  # held-out text, packed like the training text
    benchmarks: dict[str, list[MCExample]]
    stats: dict[str, Any] = field(default_factory=dict)


class PretrainTaskData(TaskData):
    fields: dict[str, str | None] = setting(
        factory=lambda: {"text": "text"},
        help='recipe field text -> your field: a name, a dotted path or a template ("{title}\\n{abstract}")',
    )

    def required_fields(self) -> tuple[str, ...]:
        return ("text",)


class PretrainRecipe(DataRecipe):
    """Raw text packed into blocks (task=pretrain, biomed, finance; tasks/pretrain.py adds the evaluation settings)."""

    data: PretrainTaskData = setting(help="the training and held-out text and the field mapping")
    benchmarks: dict[str, BenchmarkSettings] = setting(
        factory=dict, help="zero-shot multiple-choice benchmarks by name (task.eval.benchmarks picks which run)"
    )

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


def pack_documents(documents: Iterable[list[int]], block_size: int) -> list[dict[str, list[int]]]:
    """Concatenate documents (each already ending in EOS) and cut into blocks of `block_size` tokens.

    position_ids restart at 0 at each document start and at each block start; the label of every
    segment's first token is IGNORE_INDEX (it would be predicted from the previous document).
    """
    blocks: list[dict[str, list[int]]] = []
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    for doc in documents:
        offset = 0
        while offset < len(doc):
            take = min(block_size - len(ids), len(doc) - offset)
            piece = doc[offset : offset + take]
            ids += piece
            positions += list(range(take))
            labels += [IGNORE_INDEX, *piece[1:]]
            offset += take
            if len(ids) == block_size:
                blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
                ids, positions, labels = [], [], []
    if len(ids) >= 2:  # a last, shorter block (padded by the collator) when it holds something to predict
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return blocks


def _documents(settings: PretrainRecipe, part: str, limit: int | None = None) -> list[str]:
    key = f"task.data.{part}"
    records = load_records(getattr(settings.data, part), key)
    texts = [as_text(map_fields(r, settings.data.fields, "task.data.fields", ("text",))["text"]) for r in records]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoraTrainError(f"`{key}`: every document is empty; check task.data.fields.text")
    return texts[:limit] if limit else texts


def packed(
    settings: PretrainRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, part: str, limit: int | None
) -> tuple[list[dict], dict]:
    """The `part` text (train or eval; its first `limit` documents) packed into max_seq_len blocks, cached."""

    def build() -> tuple[list[dict], dict]:
        docs = [document_ids(tokenizer, text) for text in _documents(settings, part, limit)]
        blocks = pack_documents(docs, max_seq_len)
        return blocks, {"documents": len(docs), "tokens": sum(map(len, docs)), "blocks": len(blocks)}

    cache_key = {
        "recipe": "pretrain",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
        "fields": settings.data.fields,
        "limit": limit,
        "data": fingerprint_sources(getattr(settings.data, part)),
    }
    blocks, meta = cached(settings.cache_dir, f"{settings.name}-{part}", cache_key, build)
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

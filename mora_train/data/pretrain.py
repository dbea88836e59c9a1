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
from dataclasses import dataclass, field
from typing import Any, Iterable

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from mora_train.data.benchmarks import MCExample, benchmark_problems, load_benchmark
from mora_train.data.cache import cached, tokenizer_fingerprint
from mora_train.data.common import IGNORE_INDEX
from mora_train.data.recipe import check_eval_settings, common_problems
from mora_train.data.sources import as_plain, as_text, fingerprint_sources, load_records, map_fields
from mora_train.core.errors import MoraTrainError

log = logging.getLogger(__name__)


@dataclass
class PretrainData:
    train: list[dict]
    eval_blocks: list[dict]  # held-out text, packed like the training text
    benchmarks: dict[str, list[MCExample]]
    stats: dict[str, Any] = field(default_factory=dict)


def config_problems(task_cfg: DictConfig) -> list[str]:
    problems = common_problems(task_cfg, ("text",))
    eval_cfg = task_cfg.get("eval")
    check_eval_settings(eval_cfg, problems, ("max_len",))
    benchmarks = task_cfg.get("benchmarks")
    if not isinstance(benchmarks, DictConfig):
        problems.append("`task.benchmarks` must be a mapping of benchmark name -> settings (may be empty: {})")
        return problems
    selected = as_plain(eval_cfg.get("benchmarks")) if isinstance(eval_cfg, DictConfig) else None
    if selected is None:
        selected = list(benchmarks)
    if not isinstance(selected, list):
        problems.append(f"`task.eval.benchmarks` must be a list of names from task.benchmarks, got {selected!r}")
        return problems
    for name in selected:
        if name not in benchmarks:
            problems.append(f"`task.eval.benchmarks` names '{name}', which is not in task.benchmarks ({', '.join(benchmarks)})")
        else:
            problems.extend(benchmark_problems(benchmarks[name], f"task.benchmarks.{name}"))
    return problems


def selected_benchmarks(task_cfg: DictConfig) -> list[str]:
    selected = as_plain(task_cfg.eval.get("benchmarks"))
    return list(task_cfg.benchmarks) if selected is None else selected


def document_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one document, ending with EOS (BOS too if the tokenizer adds one by default)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
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
            labels += [IGNORE_INDEX] + piece[1:]
            offset += take
            if len(ids) == block_size:
                blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
                ids, positions, labels = [], [], []
    if len(ids) >= 2:  # a last, shorter block (padded by the collator) when it holds something to predict
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return blocks


def _documents(task_cfg: DictConfig, key: str, limit: int | None = None) -> list[str]:
    fields = as_plain(task_cfg.data.fields)
    records = load_records(task_cfg.data[key.rsplit(".", 1)[-1]], key)
    texts = [as_text(map_fields(r, fields, "task.data.fields", ("text",))["text"]) for r in records]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoraTrainError(f"`{key}`: every document is empty; check task.data.fields.text")
    return texts[:limit] if limit else texts


def packed(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, key: str, limit: int | None) -> tuple[list[dict], dict]:
    def build() -> tuple[list[dict], dict]:
        docs = [document_ids(tokenizer, text) for text in _documents(task_cfg, key, limit)]
        blocks = pack_documents(docs, max_seq_len)
        return blocks, {"documents": len(docs), "tokens": sum(map(len, docs)), "blocks": len(blocks)}

    source = task_cfg.data[key.rsplit(".", 1)[-1]]
    cache_key = {
        "recipe": "pretrain",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
        "fields": as_plain(task_cfg.data.fields),
        "limit": limit,
        "data": fingerprint_sources(source),
    }
    part = key.rsplit(".", 1)[-1]
    blocks, meta = cached(task_cfg.get("cache_dir"), f"{task_cfg.name}-{part}", cache_key, build)
    log.info(
        "%s %s text: %d documents, %d tokens -> %d blocks of %d tokens",
        task_cfg.name, part, meta["documents"], meta["tokens"], meta["blocks"], max_seq_len,
    )
    return blocks, meta


def _benchmarks(task_cfg: DictConfig) -> dict[str, list[MCExample]]:
    return {name: load_benchmark(task_cfg.benchmarks[name], f"task.benchmarks.{name}") for name in selected_benchmarks(task_cfg)}


def build(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> PretrainData:
    benchmarks = _benchmarks(task_cfg)  # first: bad benchmark data fails before any training
    eval_blocks, eval_meta = packed(task_cfg, tokenizer, max_seq_len, "task.data.eval", task_cfg.eval.get("max_samples"))
    train, meta = packed(task_cfg, tokenizer, max_seq_len, "task.data.train", None)
    return PretrainData(train, eval_blocks, benchmarks, {**meta, "eval_documents": eval_meta["documents"]})


def build_eval(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> PretrainData:
    benchmarks = _benchmarks(task_cfg)
    eval_blocks, _ = packed(task_cfg, tokenizer, max_seq_len, "task.data.eval", task_cfg.eval.get("max_samples"))
    return PretrainData([], eval_blocks, benchmarks)

"""Continual pretraining evaluation: perplexity on held-out domain text + zero-shot domain benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.evaluation.config import PerplexityEvalSettings
from mora_train.evaluation.multiple_choice import ChoiceQuestion, evaluate_benchmarks
from mora_train.evaluation.perplexity import loss_metrics, token_nll


def evaluate(
    settings: PerplexityEvalSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_blocks: list[dict],
    benchmarks: Mapping[str, Sequence[ChoiceQuestion]],
    collate: Callable[[list[dict]], dict[str, Any]],
    run_dir: Path,
    *,
    scoring: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Held-out loss/perplexity of `eval_blocks` (batched by `collate`), then each benchmark's accuracy.

    `scoring`: benchmark name -> how its choices are scored, `sum` or `mean` of the option's token log-probs
    (the benchmark's `score`; a name not given: sum)."""
    started = time.time()
    metrics: dict[str, Any] = loss_metrics(*token_nll(model, eval_blocks, collate, settings.batch_size))
    metrics["perplexity_runtime_s"] = time.time() - started
    if benchmarks:  # task=pretrain has none: perplexity only
        metrics.update(
            evaluate_benchmarks(
                benchmarks, scoring or {}, model, tokenizer, settings.batch_size, settings.max_len, run_dir
            )
        )
    metrics["eval_runtime_s"] = time.time() - started
    return metrics

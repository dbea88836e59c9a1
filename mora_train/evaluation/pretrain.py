"""Continual pretraining evaluation: perplexity on held-out domain text + zero-shot domain benchmarks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data.pretrain import PretrainData
from mora_train.evaluation.multiple_choice import evaluate_benchmarks
from mora_train.evaluation.perplexity import loss_metrics, token_nll


def evaluate(
    task_cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: PretrainData, run_dir: Path
) -> dict[str, Any]:
    started = time.time()
    metrics: dict[str, Any] = loss_metrics(*token_nll(model, data.eval_blocks, tokenizer.pad_token_id, task_cfg.eval.batch_size))
    metrics["perplexity_runtime_s"] = time.time() - started
    if data.benchmarks:  # task=pretrain has none: perplexity only
        metrics.update(evaluate_benchmarks(
            data.benchmarks, task_cfg.benchmarks, model, tokenizer, task_cfg.eval.batch_size, task_cfg.eval.max_len, run_dir
        ))
    metrics["eval_runtime_s"] = time.time() - started
    return metrics

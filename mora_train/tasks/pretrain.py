"""Pretraining and continual pretraining (biomed, finance, pretrain): packed text and benchmark records
from data/pretrain.py, held-out perplexity and benchmark accuracy from evaluation/pretrain.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data import pretrain as data
from mora_train.data.common import PadCollator
from mora_train.evaluation import pretrain as evaluation
from mora_train.tasks.task import Task


def evaluate(
    task_cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, built: data.PretrainData, run_dir: Path
) -> dict[str, Any]:
    return evaluation.evaluate(
        task_cfg, model, tokenizer, built.eval_blocks, built.benchmarks, PadCollator(tokenizer.pad_token_id), run_dir
    )


def task(name: str, primary_metric: str, greater_is_better: bool) -> Task:
    """One recipe, several task names: configs/task/NAME.yaml sets the text and the benchmarks."""
    return Task(
        name=name,
        primary_metric=primary_metric,
        greater_is_better=greater_is_better,
        config_problems=data.config_problems,
        build=data.build,
        build_eval=data.build_eval,
        evaluate=evaluate,
    )

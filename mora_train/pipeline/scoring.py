"""Which evaluator scores a model (`eval.backend`), after training and in mode=eval alike.

`task` (default): the task's own evaluation (task.eval.*, mora_train.tasks). `lm_eval`: lm-evaluation-harness
on eval.lm_eval.tasks (mora_train.evaluation.lm_harness); the run is then ranked by the first task's first
metric. `both`: the task's evaluation, ranked by the task's metric, and the harness's results beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mora_train.evaluation import lm_harness
from mora_train.tasks import Task


@dataclass
class Scores:
    metrics: dict[str, Any]  # the task's own metrics ({} with eval.backend=lm_eval)
    primary_metric: str
    greater_is_better: bool
    lm_eval: dict[str, Any] | None = None  # metrics.json's `lm_eval` section (None: the harness did not run)


def uses_task_evaluation(cfg: DictConfig) -> bool:
    """Whether the task's own evaluation runs (so its evaluation data must be built)."""
    return lm_harness.backend(cfg) in ("task", "both")


def not_evaluated(task: Task) -> Scores:
    """A run that was not evaluated (a failed merge check): no metrics, ranked by the task's metric."""
    return Scores({}, task.primary_metric, task.greater_is_better)


def evaluate_model(cfg: DictConfig, task: Task, model: Any, tokenizer: Any, data: Any, run_dir: Path) -> Scores:
    """Score `model` with the backends eval.backend selects (data: the task's built data, or None for lm_eval)."""
    chosen = lm_harness.backend(cfg)
    scores = not_evaluated(task)
    if chosen in ("task", "both"):
        scores.metrics = task.evaluate(cfg.task, model, tokenizer, data, run_dir)
    if chosen in ("lm_eval", "both"):
        scores.lm_eval = lm_harness.evaluate(cfg.eval.lm_eval, model, tokenizer, run_dir)
    if chosen == "lm_eval":
        scores.primary_metric, scores.greater_is_better = lm_harness.primary(scores.lm_eval, list(cfg.eval.lm_eval.tasks))
    return scores

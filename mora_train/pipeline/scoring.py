"""Which evaluator scores a model (`eval.backend`), after training and in mode=eval alike.

`task` (default): the task's own evaluation (task.eval.*, mora_train.tasks). `lm_eval`: lm-evaluation-harness
on eval.lm_eval.tasks (mora_train.evaluation.lm_harness); the run is then ranked by the first task's first
metric. `both`: the task's evaluation, ranked by the task's metric, and the harness's results beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_train.evaluation import lm_harness
from mora_train.pipeline.run_config import RunConfig
from mora_train.tasks import Task


@dataclass
class Scores:
    metrics: dict[str, Any]  # the task's own metrics ({} with eval.backend=lm_eval)
    primary_metric: str
    greater_is_better: bool
    lm_eval: dict[str, Any] | None = None  # metrics.json's `lm_eval` section (None: the harness did not run)


def not_evaluated(task: Task) -> Scores:
    """A run that was not evaluated (a failed merge check): no metrics, ranked by the task's metric."""
    return Scores({}, task.primary_metric, task.greater_is_better)


def evaluate_model(config: RunConfig, task: Task, model: Any, tokenizer: Any, data: Any, run_dir: Path) -> Scores:
    """Score `model` with the backends eval.backend selects (data: the task's built data, or None for lm_eval)."""
    scores = not_evaluated(task)
    if config.eval.runs_task:
        scores.metrics = task.evaluate(config.task, model, tokenizer, data, run_dir)
    if config.eval.runs_lm_eval:
        scores.lm_eval = lm_harness.evaluate(config.eval.lm_eval, model, tokenizer, run_dir)
    if not config.eval.runs_task:
        assert scores.lm_eval is not None
        scores.primary_metric, scores.greater_is_better = lm_harness.primary(
            scores.lm_eval, list(config.eval.lm_eval.tasks or [])
        )
    return scores

"""What a task is: a config check, a data builder, an evaluator, and the metric a sweep optimises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    primary_metric: str  # the metric a sweep optimises; evaluate() always returns it
    greater_is_better: bool  # direction of primary_metric
    config_problems: Callable[..., list[str]]  # (task_cfg) -> problems, one message each
    build: Callable[..., Any]  # (task_cfg, tokenizer, max_seq_len) -> data with a `.train` list
    evaluate: Callable[..., dict[str, Any]]  # (task_cfg, model, tokenizer, data, run_dir) -> metrics
    # Evaluation data only, for mode=eval (None: `build` is cheap enough to use instead).
    build_eval: Callable[..., Any] | None = None

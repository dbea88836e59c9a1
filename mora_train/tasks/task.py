"""What a task is: its settings section, a data builder, an evaluator, and the metric a sweep optimises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mora_train.config.schema import Section


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    primary_metric: str  # the metric a sweep optimises; evaluate() always returns it
    greater_is_better: bool  # direction of primary_metric
    # The `task` section's class (RunConfig parses `task` with it); its check() holds the task's config checks.
    settings: type[Section]
    build: Callable[..., Any]  # (settings, tokenizer, max_seq_len) -> data with a `.train` list
    evaluate: Callable[..., dict[str, Any]]  # (settings, model, tokenizer, data, run_dir) -> metrics
    # Evaluation data only, for mode=eval: (settings, tokenizer, max_seq_len) -> data (None: `build` is cheap
    # enough to use instead).
    build_eval: Callable[..., Any] | None = None
    # The held-out set as tokenized examples, for evaluation while training (trainer.eval_steps):
    # (settings, tokenizer, max_seq_len, data) -> examples; None: the task has none (task.val_size carves one).
    validation: Callable[..., Any] | None = None

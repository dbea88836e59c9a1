"""Task registry: each task recipe says how to check its config, build its data and evaluate a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mora_train.data import uuid as uuid_task
from mora_train.evaluation import uuid as uuid_eval


@dataclass(frozen=True)
class Task:
    name: str
    primary_metric: str  # the metric a sweep optimises (higher is better unless noted)
    config_problems: Callable[..., list[str]]
    build: Callable[..., Any]  # (task_cfg, tokenizer, max_seq_len) -> data with a `.train` list
    evaluate: Callable[..., dict[str, float]]  # (task_cfg, model, tokenizer, data, run_dir) -> metrics


TASKS: dict[str, Task] = {
    "uuid": Task("uuid", "char_accuracy", uuid_task.config_problems, uuid_task.build, uuid_eval.evaluate),
}

"""UUID memorization: random key -> value pairs (data/uuid.py), recalled by greedy generation (evaluation/uuid.py)."""

from __future__ import annotations

from mora_train.data import uuid as data
from mora_train.evaluation import uuid as evaluation
from mora_train.tasks.task import Task

TASK = Task(
    name="uuid",
    primary_metric="char_accuracy",
    greater_is_better=True,
    config_problems=data.config_problems,
    build=data.build,  # cheap: also what mode=eval builds
    evaluate=evaluation.evaluate,  # reads data.prompts and data.targets
)

"""The validation set training evaluates (trainer.eval_steps) and generates samples from (trainer.sample_every).

Either `task.val_size` examples carved out of the tokenized training set (a share in (0, 1) or a count, drawn
with the run's `seed`: the same config gives the same split, so a resumed run evaluates what it evaluated
before), or, when val_size is null, the task's held-out set (`task.data.eval`, the first task.eval.max_samples
records) tokenized as training examples are. UUID memorization has no held-out set: its evaluation reads the
pairs it trains on, so it needs task.val_size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mora_train.config.schema import Section, setting
from mora_train.core.errors import MoraTrainError
from mora_train.tasks.task import Task
from mora_train.training.config import TrainerConfig


class ValidationSplit(Section):
    """task.val_size: the validation set carved from the training set (every task's settings have it)."""

    val_size: int | float | None = setting(
        default=None,
        help="validation examples carved from the training set for trainer.eval_steps/sample_every: a share in "
        "(0, 1) or a count; null: the task's held-out set (task.data.eval)",
    )


@dataclass
class Validation:
    """The training examples left and the validation examples, with where the latter come from."""

    train: Any
    examples: Sequence[dict]
    source: str


def validation_problems(trainer: TrainerConfig, settings: Any, task: Task, prefix: str = "task") -> list[str]:
    """task.val_size in range and read by something; a validation set for trainer.eval_steps / sample_every."""
    val_size = getattr(settings, "val_size", None)
    key = f"{prefix}.val_size"
    if val_size is None:
        if trainer.evaluates and task.validation is None:
            asked = "eval_steps" if trainer.eval_steps > 0 else "sample_every"
            return [
                (
                    f"`trainer.{asked}={getattr(trainer, asked)}` needs a validation set, and task={task.name} has no "
                    f"held-out set (its evaluation reads what it trains on): set {key}=0.1 (a share) or {key}=4 (a "
                    "count) to carve one out of the training set, or trainer.eval_steps=0 trainer.sample_every=0"
                )
            ]
        return []
    problems = []
    if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
        problems.append(
            f"`{key}={val_size}` is a share of the training set and must be between 0 and 1 (e.g. {key}=0.1), or "
            f"give a count of examples ({key}=200); null: the task's held-out set (task.data.eval)"
        )
    elif isinstance(val_size, int) and val_size < 1:
        problems.append(
            f"`{key}={val_size}` must be a count of at least 1 or a share between 0 and 1 (e.g. {key}=0.1); "
            "null: the task's held-out set (task.data.eval)"
        )
    if not trainer.evaluates:
        problems.append(
            f"`{key}={val_size}` carves a validation set out of the training data, and nothing reads it "
            "(trainer.eval_steps=0, trainer.sample_every=0): set trainer.eval_steps=N, or drop "
            f"{key} (the run would train on fewer examples for nothing)"
        )
    return problems


def build_validation(
    task: Task, settings: Any, trainer: TrainerConfig, tokenizer: Any, built: Any, seed: int
) -> Validation | None:
    """The run's validation set (None when training reads none); `built` is what task.build returned."""
    if not trainer.evaluates:
        return None
    if settings.val_size is not None:
        return carve(built.train, settings.val_size, seed)
    if task.validation is None:  # validation_problems refuses such a config before any data is read
        raise MoraTrainError(f"task={task.name} has no held-out set: set task.val_size to carve one from training")
    examples = task.validation(settings, tokenizer, trainer.max_seq_len, built)
    if not examples:
        raise MoraTrainError(
            "`task.data.eval` gave no validation examples for trainer.eval_steps; check its records, or carve the "
            "validation set out of the training set with task.val_size=0.1"
        )
    count = len(examples)
    return Validation(built.train, examples, f"task.data.eval ({count} example{'' if count == 1 else 's'})")


def carve(train: Any, val_size: int | float, seed: int) -> Validation:
    """`val_size` examples of `train` drawn with `seed` (file order kept in both parts)."""
    try:
        total = len(train)
    except TypeError:
        raise MoraTrainError(
            f"`task.val_size={val_size}` needs a training set of known size, and this one is streamed: give the "
            "validation records in task.data.eval and drop task.val_size"
        ) from None
    count = max(1, round(total * val_size)) if isinstance(val_size, float) else int(val_size)
    if count >= total:
        raise MoraTrainError(
            f"`task.val_size={val_size}` takes {count} of the {total} training examples, leaving none to train on: "
            "give a smaller share or count"
        )
    chosen = set(random.Random(seed).sample(range(total), count))
    kept = [i for i in range(total) if i not in chosen]
    source = f"task.val_size={val_size}: {count} of {total} training examples"
    return Validation(_take(train, kept), _take(train, sorted(chosen)), source)


def _take(dataset: Any, indices: list[int]) -> Any:
    """The examples at `indices`: a list stays a list, a datasets.Dataset is selected from."""
    if not isinstance(dataset, list) and hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[i] for i in indices]

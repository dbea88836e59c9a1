"""UUID memorization: random key -> value pairs (data/uuid.py), recalled by greedy generation (evaluation/uuid.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.data import uuid as data
from mora_train.evaluation import uuid as evaluation
from mora_train.evaluation.config import UuidEvalSettings
from mora_train.tasks.task import Task
from mora_train.tasks.validation import ValidationSplit


class UuidSettings(data.UuidRecipe, ValidationSplit):
    """task=uuid: the paper's UUID memorization."""

    eval: UuidEvalSettings = setting(factory=UuidEvalSettings, help="greedy generation of each key's value")


def build(settings: UuidSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.UUIDData:
    return data.build(settings, tokenizer, max_seq_len)


def evaluate(
    settings: UuidSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    built: data.UUIDData,
    run_dir: Path,
) -> dict[str, Any]:
    return evaluation.evaluate(
        settings.eval, model, tokenizer, built, run_dir, completion_template=settings.completion_template
    )


TASK = Task(
    name="uuid",
    primary_metric="char_accuracy",
    greater_is_better=True,
    settings=UuidSettings,
    build=build,  # cheap: also what mode=eval builds
    evaluate=evaluate,  # reads data.prompts and data.targets
)

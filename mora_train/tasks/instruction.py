"""Instruction tuning: data/instruction.py builds conversations, evaluation/instruction.py measures held-out loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.data import instruction as data
from mora_train.data.common import PadCollator
from mora_train.evaluation import instruction as evaluation
from mora_train.evaluation.config import InstructionEvalSettings
from mora_train.tasks.task import Task
from mora_train.tasks.validation import ValidationSplit


class InstructionSettings(data.InstructionRecipe, ValidationSplit):
    """task=instruction: Alpaca-style or chat records, loss on the responses."""

    eval: InstructionEvalSettings = setting(
        factory=InstructionEvalSettings, help="held-out loss, plus a few generated answers (RUN_DIR/samples.jsonl)"
    )


def build(settings: InstructionSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.InstructionData:
    return data.build(settings, tokenizer, max_seq_len, settings.eval.max_samples)


def build_eval(
    settings: InstructionSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> data.InstructionData:
    return data.build_eval(settings, tokenizer, max_seq_len, settings.eval.max_samples)


def evaluate(
    settings: InstructionSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    built: data.InstructionData,
    run_dir: Path,
) -> dict[str, Any]:
    chat_template = bool(built.stats.get("chat_template"))
    return evaluation.evaluate(
        settings.eval,
        model,
        tokenizer,
        built.eval_examples,
        [c.messages for c in built.eval_conversations],
        run_dir,
        collate=PadCollator(tokenizer.pad_token_id),
        prompt=lambda messages: data.generation_prompt(tokenizer, messages, chat_template),
        prompt_has_special_tokens=chat_template,  # a rendered chat template already holds its special tokens
    )


def validation(
    settings: InstructionSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, built: data.InstructionData
) -> list[dict]:
    """The held-out conversations, tokenized as training's (loss on the responses)."""
    return built.eval_examples


TASK = Task(
    name="instruction",
    primary_metric="eval_loss",
    greater_is_better=False,
    settings=InstructionSettings,
    build=build,
    build_eval=build_eval,
    evaluate=evaluate,
    validation=validation,
)

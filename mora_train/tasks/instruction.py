"""Instruction tuning: data/instruction.py builds conversations, evaluation/instruction.py measures held-out loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data import instruction as data
from mora_train.data.common import PadCollator
from mora_train.evaluation import instruction as evaluation
from mora_train.tasks.task import Task


def evaluate(
    task_cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, built: data.InstructionData, run_dir: Path
) -> dict[str, Any]:
    chat_template = bool(built.stats.get("chat_template"))
    return evaluation.evaluate(
        task_cfg, model, tokenizer, built.eval_examples, [c.messages for c in built.eval_conversations], run_dir,
        collate=PadCollator(tokenizer.pad_token_id),
        prompt=lambda messages: data.generation_prompt(tokenizer, messages, chat_template),
        prompt_has_special_tokens=chat_template,  # a rendered chat template already holds its special tokens
    )


TASK = Task(
    name="instruction",
    primary_metric="eval_loss",
    greater_is_better=False,
    config_problems=data.config_problems,
    build=data.build,
    build_eval=data.build_eval,
    evaluate=evaluate,
)

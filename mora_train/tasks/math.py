"""Math word problems (gsm8k, metamath): data/math.py builds the data, evaluation/math.py scores generated answers.

Both sides use evaluation/answers.py's reading of a final answer: the data builder reads the gold
answer of each evaluation problem with it (so a reference without one fails before training), and
the evaluator reads the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.data import math as data
from mora_train.data.common import LengthReport, fit_to_length
from mora_train.evaluation import math as evaluation
from mora_train.evaluation.answers import extract_answer
from mora_train.evaluation.config import GenerationEvalSettings
from mora_train.tasks.task import Task
from mora_train.tasks.validation import ValidationSplit


class MathSettings(data.MathRecipe, ValidationSplit):
    """task=gsm8k / task=metamath: math word problems, evaluated on GSM8K-style final answers."""

    eval: GenerationEvalSettings = setting(
        factory=GenerationEvalSettings, help="greedy generation, final-answer extraction and exact match"
    )


def build(settings: MathSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.MathData:
    return data.build(settings, tokenizer, max_seq_len, extract_answer, settings.eval.max_samples)


def build_eval(settings: MathSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.MathData:
    return data.build_eval(settings, extract_answer, settings.eval.max_samples)


def evaluate(
    settings: MathSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    built: data.MathData,
    run_dir: Path,
) -> dict[str, Any]:
    prompts = [data.prompt(settings, problem.question) for problem in built.problems]
    return evaluation.evaluate(settings.eval, model, tokenizer, built.problems, prompts, run_dir, name=settings.name)


def validation(
    settings: MathSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, built: data.MathData
) -> list[dict]:
    """The evaluation problems with their reference solutions, tokenized as training pairs (loss on the solution;
    a solution longer than max_seq_len is cut, so every problem counts)."""
    examples = []
    for problem in built.problems:
        prompt, completion = data.format_pair(settings, problem.question, problem.reference)
        ids, labels = data.encode_pair(tokenizer, prompt, completion, max_seq_len)
        example = fit_to_length(ids, labels, max_seq_len, "truncate", LengthReport())
        if example is not None:
            examples.append(example)
    return examples


def task(name: str) -> Task:
    """One recipe, several task names: configs/task/NAME.yaml sets what differs."""
    return Task(
        name=name,
        primary_metric="accuracy",
        greater_is_better=True,
        settings=MathSettings,
        build=build,
        build_eval=build_eval,
        evaluate=evaluate,
        validation=validation,
    )

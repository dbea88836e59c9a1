"""Math word problems (gsm8k, metamath): data/math.py builds the data, evaluation/math.py scores generated answers.

Both sides use evaluation/answers.py's reading of a final answer: the data builder reads the gold
answer of each evaluation problem with it (so a reference without one fails before training), and
the evaluator reads the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data import math as data
from mora_train.evaluation import math as evaluation
from mora_train.evaluation.answers import extract_answer
from mora_train.tasks.task import Task


def build(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.MathData:
    return data.build(task_cfg, tokenizer, max_seq_len, final_answer=extract_answer)


def build_eval(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.MathData:
    return data.build_eval(task_cfg, tokenizer, max_seq_len, final_answer=extract_answer)


def evaluate(
    task_cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, built: data.MathData, run_dir: Path
) -> dict[str, Any]:
    prompts = [data.prompt(task_cfg, problem.question) for problem in built.problems]
    return evaluation.evaluate(task_cfg, model, tokenizer, built.problems, prompts, run_dir)


def task(name: str) -> Task:
    """One recipe, several task names: configs/task/NAME.yaml sets what differs."""
    return Task(
        name=name,
        primary_metric="accuracy",
        greater_is_better=True,
        config_problems=data.config_problems,
        build=build,
        build_eval=build_eval,
        evaluate=evaluate,
    )

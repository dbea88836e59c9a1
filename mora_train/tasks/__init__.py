"""Task registry: each task recipe says how to check its config, build its data and evaluate a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mora_train.data import instruction as instruction_task
from mora_train.data import math as math_task
from mora_train.data import pretrain as pretrain_task
from mora_train.data import uuid as uuid_task
from mora_train.evaluation import instruction as instruction_eval
from mora_train.evaluation import math as math_eval
from mora_train.evaluation import pretrain as pretrain_eval
from mora_train.evaluation import uuid as uuid_eval


@dataclass(frozen=True)
class Task:
    name: str
    primary_metric: str  # the metric a sweep optimises
    config_problems: Callable[..., list[str]]
    build: Callable[..., Any]  # (task_cfg, tokenizer, max_seq_len) -> data with a `.train` list
    evaluate: Callable[..., dict[str, float]]  # (task_cfg, model, tokenizer, data, run_dir) -> metrics
    # Evaluation data only, for mode=eval (None: `build` is cheap enough to use instead).
    build_eval: Callable[..., Any] | None = None
    greater_is_better: bool = True  # direction of primary_metric


def _data_task(name: str, primary: str, recipe: Any, evaluation: Any, greater_is_better: bool = True) -> Task:
    return Task(name, primary, recipe.config_problems, recipe.build, evaluation.evaluate, recipe.build_eval, greater_is_better)


TASKS: dict[str, Task] = {
    "uuid": Task("uuid", "char_accuracy", uuid_task.config_problems, uuid_task.build, uuid_eval.evaluate),
    # The recipe modules serve several task names; configs/task/NAME.yaml sets what differs.
    "gsm8k": _data_task("gsm8k", "accuracy", math_task, math_eval),
    "metamath": _data_task("metamath", "accuracy", math_task, math_eval),
    "instruction": _data_task("instruction", "eval_loss", instruction_task, instruction_eval, greater_is_better=False),
    "biomed": _data_task("biomed", "benchmark_mean_accuracy", pretrain_task, pretrain_eval),
    "finance": _data_task("finance", "benchmark_mean_accuracy", pretrain_task, pretrain_eval),
    # Pretraining (from scratch or continued): the same packed-text recipe, held-out perplexity only.
    "pretrain": _data_task("pretrain", "eval_perplexity", pretrain_task, pretrain_eval, greater_is_better=False),
}

"""One check of the whole composed config, before any model is loaded: every problem in one ConfigError.

Each layer owns the checks of its own section (config: trainer/model/seed/mode; adapters: adapter.* and
rank; training: restarts and the distributed engine; tasks: task.*; evaluation: eval.*, the backend); this
collects them in one place.
"""

from __future__ import annotations

from omegaconf import DictConfig

from mora_train.adapters import adapter_config_problems
from mora_train.config.validation import config_problems
from mora_train.core.errors import ConfigError
from mora_train.evaluation.lm_harness import config_problems as eval_problems
from mora_train.models.quantization import QUANTIZATIONS, quantization_of, quantization_problems
from mora_train.pipeline.relaunch import relaunch_problems
from mora_train.tasks import TASKS
from mora_train.training.distributed import config_problems as engine_problems
from mora_train.training.restarts import restart_problems


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raise ConfigError listing every problem found."""
    problems = config_problems(cfg)
    model_section = cfg.get("model") if isinstance(cfg.get("model"), DictConfig) else None
    problems += quantization_problems(model_section) if model_section is not None else []
    # The other sections check against a known quantization name only (an unknown one is one message already).
    quantization = quantization_of(model_section) if model_section is not None else "none"
    quantization = quantization if quantization in QUANTIZATIONS else "none"
    problems += adapter_config_problems(cfg.get("adapter"), cfg.get("rank"), quantization)
    problems += restart_problems(cfg.get("adapter"), quantization)
    task_name = cfg.task.get("name") if isinstance(cfg.get("task"), DictConfig) else None
    if task_name not in TASKS:
        problems.append(f"`task.name={task_name}` is unknown; use one of: {', '.join(sorted(TASKS))}")
    else:
        problems.extend(TASKS[task_name].config_problems(cfg.task))
    problems += eval_problems(cfg)  # eval.backend and, when the harness runs, eval.lm_eval.*
    problems += engine_problems(cfg)
    problems += relaunch_problems(cfg)  # accelerate.*: a job as a multi-process launch of itself
    if problems:
        raise ConfigError(problems)

"""One check of the whole config, before any model is loaded: every problem in one ConfigError.

`read_run_config` checks each section on its own (types, unknown keys, the section's `check`); this adds the
checks that need two sections (a method on a quantized base, restarts on it, the engine against the trainer
and the method, the evaluation backend against the task, trainer.hf against transformers, the validation set of
evaluation while training against the task and the engine, a data stream against the step budget).
"""

from __future__ import annotations

from mora_train.adapters import adapter_config_problems
from mora_train.core.errors import ConfigError
from mora_train.data.config import DataRecipe
from mora_train.evaluation import lm_harness
from mora_train.pipeline.run_config import ComposedConfig, RunConfig
from mora_train.tasks import TASKS
from mora_train.tasks.validation import validation_problems
from mora_train.training import distributed_config
from mora_train.training.eval_callbacks import engine_problems
from mora_train.training.hf_arguments import hf_problems
from mora_train.training.restarts import restart_problems


def cross_section_problems(run: RunConfig) -> list[str]:
    """Problems that need more than one section (each section's own are found by read_run_config)."""
    quantization = run.model.quantization_name
    problems = adapter_config_problems(run.adapter, run.rank, run.trainer, quantization)
    problems += restart_problems(run.trainer, quantization)
    problems += hf_problems(run.trainer)
    problems += lm_harness.config_problems(run.eval, run.task.name)
    problems += distributed_config.config_problems(run.distributed, run.trainer, run.adapter, quantization=quantization)
    problems += validation_problems(run.trainer, run.task, TASKS[run.task.name])  # evaluation while training
    problems += engine_problems(run.trainer, run.distributed.engine)
    if isinstance(run.task, DataRecipe):
        problems += run.task.step_budget_problems(run.trainer.max_steps, "task", "trainer.max_steps")
    return problems


def validate(composed: ComposedConfig) -> RunConfig:
    """The typed config of a run; ConfigError listing every problem found when it is not valid."""
    run, problems = composed.read_with_problems()
    if run.has_known_variants:  # an unknown adapter.name or task.name is one problem already
        problems += cross_section_problems(run)
    if problems:
        raise ConfigError(problems)
    return run

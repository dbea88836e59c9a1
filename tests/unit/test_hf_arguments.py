"""trainer.hf, trainer.optim and trainer.lr_scheduler are checked against the installed transformers."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import SchedulerType, TrainingArguments, get_scheduler

import mora_train.training.distributed_config as distributed_config_module
import mora_train.training.trainer as trainer_module
from mora_train.core.errors import ConfigError
from mora_train.training.config import TrainerConfig
from mora_train.training.hf_arguments import OWNED_FIELDS, hf_arguments, hf_problems, scheduler_rule


def only_problem(trainer: TrainerConfig) -> str:
    problems = hf_problems(trainer)
    assert len(problems) == 1, problems
    return problems[0]


# -- trainer.hf -----------------------------------------------------------------------------------------------


def test_hf_field_accepted_and_converted_to_its_type(tmp_path: Path) -> None:
    trainer = TrainerConfig(hf={"neftune_noise_alpha": 5, "logging_strategy": "steps", "adam_beta2": 1})
    assert hf_problems(trainer) == []
    kwargs = hf_arguments(trainer)
    assert kwargs == {"neftune_noise_alpha": 5.0, "logging_strategy": "steps", "adam_beta2": 1.0}
    assert isinstance(kwargs["neftune_noise_alpha"], float)  # YAML's 5 where transformers expects a float
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    assert args.neftune_noise_alpha == 5.0


def test_unknown_field_refused_with_close_names_and_version_hint() -> None:
    problem = only_problem(TrainerConfig(hf={"not_a_field": 1}))
    assert "`trainer.hf.not_a_field` is not a field of transformers.TrainingArguments" in problem
    assert "transformers" in problem and "version" in problem
    problem = only_problem(TrainerConfig(hf={"neftune_noise_alph": 5}))
    assert "did you mean neftune_noise_alpha" in problem
    with pytest.raises(ConfigError):
        hf_arguments(TrainerConfig(hf={"not_a_field": 1}))


@pytest.mark.parametrize(
    "field, ours",
    [
        ("learning_rate", "trainer.learning_rate"),
        ("per_device_train_batch_size", "trainer.micro_batch_size"),
        ("gradient_accumulation_steps", "trainer.batch_size"),
        ("num_train_epochs", "trainer.num_epochs"),
        ("lr_scheduler_type", "trainer.lr_scheduler"),
        ("bf16", "trainer.precision"),
        ("gradient_checkpointing", "trainer.gradient_checkpointing"),
        ("seed", "`seed`"),
        ("output_dir", "`output_dir`"),
        ("report_to", "logging.report_to"),
        ("deepspeed", "distributed="),
        ("resume_from_checkpoint", "trainer.resume"),
        ("eval_strategy", "trainer.eval_steps"),
        ("eval_steps", "trainer.eval_steps"),
        ("load_best_model_at_end", "trainer.load_best"),
        ("per_device_eval_batch_size", "trainer.micro_batch_size"),
        ("metric_for_best_model", "eval_loss"),
    ],
)
def test_field_mora_train_owns_points_to_our_key(field: str, ours: str) -> None:
    problem = only_problem(TrainerConfig(hf={field: 1}))
    assert f"`trainer.hf.{field}` is set by mora-train" in problem and ours in problem


def test_owned_fields_cover_what_training_arguments_sets() -> None:
    """Every TrainingArguments field mora-train's own code sets must be refused in trainer.hf."""
    set_by_us = _keys_set_in(trainer_module.training_arguments) | _keys_set_in(
        distributed_config_module.training_arguments_kwargs
    )
    assert set_by_us, "found no TrainingArguments keys: has training_arguments moved?"
    assert set_by_us <= set(OWNED_FIELDS), sorted(set_by_us - set(OWNED_FIELDS))
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(OWNED_FIELDS) <= fields, sorted(set(OWNED_FIELDS) - fields)


def _keys_set_in(function: Any) -> set[str]:
    """Keyword names of dict(...)/update(...) calls and string subscripts assigned inside `function`."""
    keys = set()
    for sub in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function)))):
        if isinstance(sub, ast.Call) and getattr(sub.func, "id", getattr(sub.func, "attr", "")) in ("dict", "update"):
            keys |= {kw.arg for kw in sub.keywords if kw.arg}
        elif isinstance(sub, ast.Assign):
            for target in sub.targets:
                if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                    keys.add(str(target.slice.value))
    return keys


@pytest.mark.parametrize(
    "value, expected",
    [("yes", "must be bool, got 'yes'"), (3, "must be bool, got 3")],
)
def test_wrong_type_names_the_expected_type(value: Any, expected: str) -> None:
    problem = only_problem(TrainerConfig(hf={"torch_compile": value}))
    assert "`trainer.hf.torch_compile`" in problem and expected in problem


def test_wrong_type_of_optional_list_and_enum_fields() -> None:
    problem = only_problem(TrainerConfig(hf={"neftune_noise_alpha": "five"}))
    assert "must be a number or null" in problem
    problem = only_problem(TrainerConfig(hf={"include_for_metrics": ["loss", 3]}))
    assert "must be a list of str" in problem
    problem = only_problem(TrainerConfig(hf={"logging_strategy": "stepz"}))
    assert "must be one of no, steps, epoch" in problem and "did you mean steps" in problem


def test_fields_needing_an_eval_loop_refused_without_eval_steps() -> None:
    problem = only_problem(TrainerConfig(hf={"eval_on_start": True}))
    assert "trainer.hf.eval_on_start=True" in problem and "evaluation loop" in problem
    assert "trainer.eval_steps=N" in problem and "task.val_size" in problem
    assert hf_problems(TrainerConfig(hf={"eval_on_start": False})) == []
    assert hf_problems(TrainerConfig(eval_steps=5, hf={"eval_on_start": True})) == []
    assert hf_arguments(TrainerConfig(eval_steps=5, hf={"eval_on_start": True})) == {"eval_on_start": True}


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "greedy"])
def test_schedulers_steered_by_eval_loss_need_eval_steps(name: str, tmp_path: Path) -> None:
    problem = only_problem(TrainerConfig(lr_scheduler=name))
    assert f"`trainer.lr_scheduler={name}` cannot be used" in problem and "trainer.eval_steps=N" in problem
    trainer = TrainerConfig(lr_scheduler=name, eval_steps=5, save_steps=5)
    assert hf_problems(trainer) == []
    args = trainer_module.training_arguments(trainer, 0, tmp_path)  # transformers accepts it (an eval strategy)
    assert args.eval_strategy == "steps" and args.metric_for_best_model == "eval_loss"


# -- trainer.optim --------------------------------------------------------------------------------------------


def test_optimizer_names() -> None:
    assert hf_problems(TrainerConfig(optim="adafactor")) == []
    problem = only_problem(TrainerConfig(optim="adamw_tourch"))
    assert "`trainer.optim=adamw_tourch`" in problem and "did you mean adamw_torch" in problem


def test_optimizer_needing_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    for optim in ("paged_adamw_8bit", "adamw_8bit", "lion_32bit"):
        problem = only_problem(TrainerConfig(optim=optim))
        assert "needs the package bitsandbytes" in problem and "pip install bitsandbytes" in problem
    assert hf_problems(TrainerConfig(optim="adamw_torch")) == []


# -- trainer.lr_scheduler -------------------------------------------------------------------------------------


def test_cosine_with_min_lr_needs_exactly_one_floor() -> None:
    problem = only_problem(TrainerConfig(lr_scheduler="cosine_with_min_lr"))
    assert "needs min_lr or min_lr_rate" in problem and "trainer.lr_scheduler_kwargs" in problem
    assert hf_problems(TrainerConfig(lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})) == []
    both = {"min_lr": 1e-5, "min_lr_rate": 0.1}
    assert "only one of" in only_problem(TrainerConfig(lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs=both))


def test_scheduler_names_and_arguments() -> None:
    problem = only_problem(TrainerConfig(lr_scheduler="cosin"))
    assert "`trainer.lr_scheduler=cosin`" in problem and "did you mean cosine" in problem
    problem = only_problem(TrainerConfig(lr_scheduler="cosine", lr_scheduler_kwargs={"num_cycle": 1}))
    assert "not an argument of the cosine scheduler" in problem and "num_cycles" in problem
    problem = only_problem(TrainerConfig(lr_scheduler="linear", lr_scheduler_kwargs={"num_training_steps": 9}))
    assert "set by mora-train from `trainer.max_steps`" in problem
    problem = only_problem(TrainerConfig(lr_scheduler="warmup_stable_decay"))
    assert "needs num_decay_steps" in problem
    kwargs = {"num_decay_steps": 2, "decay_type": "cosin"}
    assert "did you mean cosine" in only_problem(
        TrainerConfig(lr_scheduler="warmup_stable_decay", lr_scheduler_kwargs=kwargs)
    )


def _sample(tp: Any) -> Any:
    """A small value of annotation `tp` (int steps, float rates)."""
    members = typing.get_args(tp) or (tp,)
    return 2 if int in members else 0.1


@pytest.mark.parametrize("name", [s.value for s in SchedulerType])
def test_every_scheduler_is_accepted_and_runs_or_is_refused_with_a_reason(name: str) -> None:
    rule = scheduler_rule(name)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if rule.refusal:
        problem = only_problem(TrainerConfig(lr_scheduler=name))
        assert f"`trainer.lr_scheduler={name}` cannot be used: " in problem and len(rule.refusal) > 40
        return
    kwargs = {arg: _sample(rule.types.get(arg)) for arg in rule.required}
    if rule.exactly_one_of:
        kwargs[rule.exactly_one_of[-1]] = _sample(rule.types.get(rule.exactly_one_of[-1]))
    assert hf_problems(TrainerConfig(lr_scheduler=name, lr_scheduler_kwargs=kwargs)) == []
    # "accepted" means transformers builds and steps it the way Trainer calls it, without an eval metric.
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=2, num_training_steps=10, scheduler_specific_kwargs=kwargs
    )
    assert "metrics" not in inspect.signature(scheduler.step).parameters, f"{name} needs an eval metric: refuse it"
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    if kwargs:  # what the rule requires is really required
        assert hf_problems(TrainerConfig(lr_scheduler=name)) != []
        with pytest.raises((TypeError, ValueError)):
            get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)

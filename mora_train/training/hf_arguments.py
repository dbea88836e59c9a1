"""`trainer.hf` (any other transformers TrainingArguments field), `trainer.optim` and `trainer.lr_scheduler`,
checked against the installed transformers before a model loads.

Everything here is read from transformers itself (TrainingArguments' dataclass fields and annotations,
OptimizerNames, SchedulerType, the scheduler functions' signatures), so a transformers upgrade that adds or
renames a field, optimizer or scheduler is followed without editing a list. The few rules a signature cannot
show are data below, each saying where in transformers it comes from.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

import transformers
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from mora_train.config.schema import closest
from mora_train.core.errors import ConfigError
from mora_train.training.config import TrainerConfig
from mora_train.training.hf_types import Mismatch, enum_hint, expected_type, fit_annotation

# TrainingArguments fields mora-train sets from its own keys (training.trainer.training_arguments and
# training.distributed_config.training_arguments_kwargs): where to set each instead. A test checks that every
# field those functions set is listed here.
OWNED_FIELDS: dict[str, str] = {
    "output_dir": "`output_dir` (checkpoints go to OUTPUT_DIR/checkpoints)",
    "per_device_train_batch_size": "`trainer.micro_batch_size`",
    "gradient_accumulation_steps": "`trainer.batch_size` and `trainer.micro_batch_size` (accumulation = "
    "batch_size / (micro_batch_size x processes))",
    "max_steps": "`trainer.max_steps`",
    "num_train_epochs": "`trainer.num_epochs`",
    "learning_rate": "`trainer.learning_rate`",
    "lr_scheduler_type": "`trainer.lr_scheduler`",
    "lr_scheduler_kwargs": "`trainer.lr_scheduler_kwargs`",
    "optim": "`trainer.optim`",
    "warmup_steps": "`trainer.warmup_steps`",
    "weight_decay": "`trainer.weight_decay`",
    "max_grad_norm": "`trainer.max_grad_norm`",
    "bf16": "`trainer.precision`",
    "fp16": "`trainer.precision`",
    "gradient_checkpointing": "`trainer.gradient_checkpointing`",
    "gradient_checkpointing_kwargs": "`trainer.gradient_checkpointing` (non-reentrant, so adapters behind "
    "frozen embeddings get gradients)",
    "activation_checkpointing": "`trainer.gradient_checkpointing`",
    "activation_checkpointing_kwargs": "`trainer.gradient_checkpointing` (non-reentrant, so adapters behind "
    "frozen embeddings get gradients)",
    "logging_steps": "`trainer.logging_steps`",
    "logging_first_step": "`trainer.logging_steps` (the first step is always logged)",
    "save_strategy": "`trainer.save_steps` (0: only at the end)",
    "save_steps": "`trainer.save_steps`",
    "save_total_limit": "`trainer.save_total_limit`",
    "report_to": "`logging.report_to` (mora-train adds the trackers as callbacks itself)",
    "seed": "`seed` (each process gets seed + rank)",
    "data_seed": "`seed` (the same data order on every process)",
    "resume_from_checkpoint": "`trainer.resume`",
    "eval_strategy": "`trainer.eval_steps` (0: no evaluation during training)",
    "eval_steps": "`trainer.eval_steps`",
    "per_device_eval_batch_size": "`trainer.micro_batch_size`",
    "load_best_model_at_end": "`trainer.load_best`",
    "metric_for_best_model": "mora-train itself (eval_loss: the validation loss early stopping and load_best compare)",
    "greater_is_better": "mora-train itself (a lower eval_loss is better)",
    "prediction_loss_only": "mora-train itself (true: evaluation during training computes the loss only)",
    "deepspeed": "`distributed=zero2`, `zero3` or `deepspeed` (with `distributed.deepspeed_config` and "
    "`distributed.deepspeed_overrides`)",
    "fsdp": "`distributed=fsdp`",
    "fsdp_config": "`distributed=fsdp` with `distributed.fsdp_config`",
    "ddp_find_unused_parameters": "`distributed.ddp_find_unused_parameters`",
    "parallelism_config": "`distributed=...` (mora-train runs data parallelism only: none, ddp, fsdp, zero2, zero3)",
    "use_cpu": "whether a CUDA GPU is visible (hide the GPUs with CUDA_VISIBLE_DEVICES= to train on the CPU)",
    "local_rank": "the launcher (accelerate launch or torchrun)",
    # Fixed by training_arguments because mora-train's own code relies on the value.
    "dataloader_num_workers": "mora-train itself (0: the examples are tokenized in memory already)",
    "remove_unused_columns": "mora-train itself (false: the collator reads the columns the model does not take)",
    "include_num_input_tokens_seen": "mora-train itself (non_padding: the tokens/s metric counts them)",
    "disable_tqdm": "mora-train itself",
}

# Fields that make Trainer evaluate, with the value that does not: Trainer gets the validation set only with
# trainer.eval_steps > 0, and would fail at its first evaluation without it.
_NEEDS_EVAL_LOOP: dict[str, Any] = {"eval_on_start": False}

# Schedulers that Trainer steps with an evaluation metric (its isinstance checks for ReduceLROnPlateau and
# GreedyLR; TrainingArguments refuses both without an eval strategy). A signature cannot tell: a test
# checks that every scheduler whose step() takes a metric is listed here.
_METRIC_DRIVEN = frozenset({"reduce_lr_on_plateau", "greedy"})

# Arguments that default to None although the function raises unless exactly one of them is given
# (get_cosine_with_min_lr_schedule_with_warmup*: "One of min_lr or min_lr_rate should be set" / "Only one of
# min_lr or min_lr_rate should be set"); invisible to a signature, so read from transformers.optimization.
_EXACTLY_ONE_OF: dict[str, tuple[str, ...]] = {
    "cosine_with_min_lr": ("min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("min_lr", "min_lr_rate"),
}

# Argument values a scheduler function checks at call time (get_wsd_schedule raises on others).
_ARGUMENT_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("warmup_stable_decay", "warmup_type"): ("linear", "cosine", "1-sqrt"),
    ("warmup_stable_decay", "decay_type"): ("linear", "cosine", "1-sqrt"),
}

# Scheduler arguments Trainer passes itself (get_scheduler), or restores on resume: where they come from.
_SCHEDULER_OWNED = {
    "optimizer": "`trainer.optim`",
    "num_warmup_steps": "`trainer.warmup_steps`",
    "num_training_steps": "`trainer.max_steps` (or `trainer.num_epochs`)",
    "last_epoch": "`trainer.resume` (the scheduler's state is restored from the checkpoint)",
}

# The package each optimizer handler of transformers.trainer_optimizer imports: (module, pip name).
_HANDLER_PACKAGES: dict[str, tuple[str, str]] = {
    "_get_bitsandbytes_optimizer": ("bitsandbytes", "bitsandbytes"),
    "_get_galore_optimizer": ("galore_torch", "galore-torch"),
    "_get_apollo_optimizer": ("apollo_torch", "apollo-torch"),
    "_get_torchao_optimizer": ("torchao", "torchao"),
    "_get_schedule_free_optimizer": ("schedulefree", "schedulefree"),
    "_get_grokadamw": ("grokadamw", "grokadamw"),
    "_get_lomo_optimizer": ("lomo_optim", "lomo-optim"),
    "_get_stable_adamw": ("optimi", "torch-optimi"),
    "_get_adamw_anyprecision": ("torchdistx", "torchdistx"),
    "_get_adamw_torch_xla": ("torch_xla", "torch_xla"),
    "_get_adamw_torch_npu_fused": ("torch_npu", "torch_npu"),
}


# -- public ---------------------------------------------------------------------------------------------------


def hf_arguments(trainer: TrainerConfig) -> dict[str, Any]:
    """TrainingArguments keyword arguments from `trainer.hf`, each converted to its field's type (an int
    where transformers expects a float becomes a float). Raises ConfigError on a key `hf_problems` refuses."""
    problems: list[str] = []
    kwargs = _hf_fields(trainer.hf, "trainer", problems, trainer.eval_steps > 0)
    if problems:
        raise ConfigError(problems)
    return kwargs


def hf_problems(trainer: TrainerConfig, prefix: str = "trainer") -> list[str]:
    """Every problem with `trainer.hf`, `trainer.optim` and `trainer.lr_scheduler(_kwargs)`, one message each."""
    problems: list[str] = []
    evaluates = trainer.eval_steps > 0
    _hf_fields(trainer.hf, prefix, problems, evaluates)
    problems += optimizer_problems(trainer.optim, prefix)
    problems += scheduler_problems(trainer.lr_scheduler, trainer.lr_scheduler_kwargs, prefix, evaluates)
    return problems


@dataclasses.dataclass(frozen=True)
class SchedulerRule:
    """What a transformers scheduler needs in `trainer.lr_scheduler_kwargs`."""

    name: str
    accepted: frozenset[str]  # the arguments it takes from lr_scheduler_kwargs
    any_kwargs: bool  # it also takes **kwargs (then unknown names are not refused here)
    required: tuple[str, ...]  # each must be given
    exactly_one_of: tuple[str, ...]  # exactly one of these must be given (empty: no such rule)
    types: Mapping[str, Any]  # annotation of each accepted argument that has one
    refusal: str | None  # why mora-train cannot run it at all


@functools.cache
def scheduler_rule(name: str) -> SchedulerRule:
    """The rule for scheduler `name` (a SchedulerType value), from its function's signature in transformers."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    function = typing.cast(Callable[..., Any], TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)])
    parameters = list(inspect.signature(function).parameters.values())
    own = [p for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in _SCHEDULER_OWNED]
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):  # an annotation that does not resolve: check names only
        hints = {}
    refusal = None
    if name in _METRIC_DRIVEN:
        refusal = (
            "it steers the learning rate by the validation loss, and trainer.eval_steps=0 runs no evaluation "
            "during training: set trainer.eval_steps=N (with a validation set: task.data.eval or task.val_size), "
            "or use a fixed schedule such as cosine, cosine_with_min_lr (with lr_scheduler_kwargs "
            "{min_lr_rate: 0.1}) or warmup_stable_decay (with {num_decay_steps: N})"
        )
    return SchedulerRule(
        name=name,
        accepted=frozenset(p.name for p in own),
        any_kwargs=any(p.kind is p.VAR_KEYWORD for p in parameters),
        required=tuple(p.name for p in own if p.default is inspect.Parameter.empty),
        exactly_one_of=_EXACTLY_ONE_OF.get(name, ()),
        types={p.name: hints[p.name] for p in own if p.name in hints},
        refusal=refusal,
    )


def optimizer_problems(optim: str, prefix: str = "trainer") -> list[str]:
    """`optim` must be a transformers optimizer whose package is installed."""
    names = [o.value for o in OptimizerNames]
    if optim not in names:
        return [
            (
                f"`{prefix}.optim={optim}` is not an optimizer of transformers {transformers.__version__}"
                f"{closest(optim, names)}; known: {', '.join(names)}"
            )
        ]
    package = _optimizer_package(optim)
    if package is not None and importlib.util.find_spec(package[0]) is None:
        return [
            (
                f"`{prefix}.optim={optim}` needs the package {package[1]}, which is not installed: pip install "
                f"{package[1]}, or choose another optimizer (e.g. {prefix}.optim=adamw_torch)"
            )
        ]
    return []


def scheduler_problems(
    name: str, kwargs: Mapping[str, Any], prefix: str = "trainer", evaluates: bool = False
) -> list[str]:
    """`name` must be a transformers scheduler mora-train can run, and `kwargs` what it needs and accepts.
    `evaluates`: training evaluates (trainer.eval_steps > 0), which schedulers steered by eval_loss need."""
    names = [s.value for s in SchedulerType]
    if name not in names:
        return [
            (
                f"`{prefix}.lr_scheduler={name}` is not a scheduler of transformers {transformers.__version__}"
                f"{closest(name, names)}; known: {', '.join(names)}"
            )
        ]
    rule = scheduler_rule(name)
    if rule.refusal and not (evaluates and name in _METRIC_DRIVEN):
        return [f"`{prefix}.lr_scheduler={name}` cannot be used: {rule.refusal}"]
    key = f"{prefix}.lr_scheduler_kwargs"
    accepted = ", ".join(sorted(rule.accepted)) or "none"
    problems = []
    for arg, value in kwargs.items():
        if arg in _SCHEDULER_OWNED:
            problems.append(f"`{key}.{arg}` is set by mora-train from {_SCHEDULER_OWNED[arg]}; remove it")
        elif arg not in rule.accepted and not rule.any_kwargs:
            problems.append(
                f"`{key}.{arg}` is not an argument of the {name} scheduler{closest(arg, sorted(rule.accepted))}; "
                f"it accepts: {accepted}"
            )
        else:
            problems += _scheduler_value_problems(rule, arg, value, key)
    missing = [arg for arg in rule.required if arg not in kwargs]
    if missing:
        given = ", ".join(f"{arg}: ..." for arg in missing)
        problems.append(f"`{prefix}.lr_scheduler={name}` needs {' and '.join(missing)} in `{key}` (e.g. {{{given}}})")
    if rule.exactly_one_of:
        chosen = [arg for arg in rule.exactly_one_of if kwargs.get(arg) is not None]
        if len(chosen) != 1:
            options = " or ".join(rule.exactly_one_of)
            what = "needs" if not chosen else "takes only one of"
            problems.append(
                f"`{prefix}.lr_scheduler={name}` {what} {options} in `{key}` (e.g. {{{rule.exactly_one_of[-1]}: 0.1}})"
            )
    return problems


# -- trainer.hf -----------------------------------------------------------------------------------------------


@functools.cache
def _training_fields() -> dict[str, Any]:
    """Each TrainingArguments field a caller may pass, with its resolved annotation (Any where none resolves)."""
    try:
        hints = typing.get_type_hints(TrainingArguments)
    except (NameError, TypeError):  # an annotation that does not resolve: accept any value, refuse no valid one
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _hf_fields(hf: Mapping[str, Any], prefix: str, problems: list[str], evaluates: bool) -> dict[str, Any]:
    """The accepted fields of `hf`, converted; every refused one is a message in `problems`.
    `evaluates`: trainer.eval_steps > 0 (Trainer then has a validation set to evaluate)."""
    fields = _training_fields()
    kwargs: dict[str, Any] = {}
    for name, value in hf.items():
        key = f"{prefix}.hf.{name}"
        if name not in fields:
            problems.append(
                f"`{key}` is not a field of transformers.TrainingArguments{closest(name, list(fields))}; check the "
                f"name against the documentation of the installed transformers {transformers.__version__} "
                "(fields are added and renamed between versions)"
            )
        elif name in OWNED_FIELDS:
            problems.append(f"`{key}` is set by mora-train from {OWNED_FIELDS[name]}; set that instead of {prefix}.hf")
        else:
            try:
                converted = fit_annotation(fields[name], value)
            except Mismatch:
                problems.append(
                    f"`{key}` must be {expected_type(fields[name])}, got {value!r}{enum_hint(fields[name], value)}"
                )
                continue
            if name in _NEEDS_EVAL_LOOP and converted != _NEEDS_EVAL_LOOP[name] and not evaluates:
                problems.append(
                    f"`{key}={value}` needs an evaluation loop during training, and `{prefix}.eval_steps=0` runs "
                    f"none: set {prefix}.eval_steps=N (with a validation set: task.data.eval or task.val_size), "
                    f"or remove {key}"
                )
                continue
            kwargs[name] = converted
    return kwargs


def _scheduler_value_problems(rule: SchedulerRule, arg: str, value: Any, key: str) -> list[str]:
    choices = _ARGUMENT_CHOICES.get((rule.name, arg))
    if choices is not None and value not in choices:
        return [f"`{key}.{arg}={value}` is not one of {', '.join(choices)}{closest(str(value), list(choices))}"]
    if arg in rule.types:
        try:
            fit_annotation(rule.types[arg], value)
        except Mismatch:
            return [f"`{key}.{arg}` must be {expected_type(rule.types[arg])}, got {value!r}"]
    return []


def _optimizer_package(optim: str) -> tuple[str, str] | None:
    """(module, pip name) of the package transformers imports for `optim`; None: only torch is needed."""
    from transformers import trainer_optimizer

    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if handlers is not None:
        handler = handlers.get(OptimizerNames(optim))
        return _HANDLER_PACKAGES.get(getattr(handler, "__name__", ""))
    # Older or newer layout without that table: the bitsandbytes names at least are recognisable.
    if "bnb" in optim or optim.startswith("paged_") or ("bit" in optim and "torch" not in optim):
        return ("bitsandbytes", "bitsandbytes")
    return None

"""Periodic merge-and-restart of an adapter (ReMoRA for MoRA, ReLoRA for LoRA), and trained base weights.

Every `trainer.restart.every_steps` = T optimizer steps (T, 2T, ... but not after the last step):

1. merge ΔW into the base weights (float32 maths, checked finite);
2. re-initialise the adapter: MoRA M = 0; LoRA A random (kaiming-uniform, as peft), B = 0;
3. MoRA only: switch the operator pair to the next entry of `trainer.restart.mora_types`
   (sharing <-> grouping, i.e. official 1 <-> 2, by default; e.g. [1, 2, 3, 4] cycles four);
4. drop the optimizer state (Adam moments and step count) of the adapter parameters only: the
   optimizer state of other trained parameters (embeddings, LM head) is kept;
5. restart the learning-rate warm-up (`lr_schedule=jagged`: the trainer's schedule times a linear
   re-warm-up over `warmup_steps` after each restart, as ReLoRA; `cosine_restarts`: each cycle of T
   steps warms up over `warmup_steps` then decays by a cosine to `min_lr_ratio`).

Merging with M = 0 (or B = 0) afterwards leaves the model's function unchanged, so the loss does not
jump at a restart; only the update directions available to the next cycle change.

Checkpoints: the adapter checkpoint holds only the live adapter, which no longer describes the model
after a restart. `BaseWeightsState` therefore adds to every checkpoint `base_weights.safetensors`
(the current weights of the targeted layers, i.e. base + every merged ΔW, and of the embeddings and
LM head when `trainer.train_embeddings=true`) and `restart_state.json` (restarts done and the
operator type of every MoRA layer), and loads both on resume: a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from mora_train.adapters import Adapter
from mora_train.adapters.capabilities import operator_switching, operator_types, restartable
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically
from mora_train.training.config import RestartConfig, TrainerConfig

log = logging.getLogger(__name__)

BASE_WEIGHTS_NAME = "base_weights.safetensors"
RESTART_STATE_NAME = "restart_state.json"


# ----------------------------------------------------------------------------------------------
# Config


def restart_problems(trainer: TrainerConfig, quantization: str) -> list[str]:
    """What trainer.restart cannot do with the base model (RestartConfig.check has the section's own checks).

    `quantization`: model.quantization. Restarts fold ΔW into the base weights; a 4-/8-bit base would have
    to be re-quantized at every restart, losing most of each small ΔW, so the combination is refused."""
    every_steps = trainer.restart.every_steps
    if quantization == "none" or every_steps <= 0:
        return []
    return [
        (
            f"`trainer.restart.every_steps={every_steps}` (ReMoRA/ReLoRA) with `model.quantization={quantization}`: "
            "each restart folds ΔW into the base weights, which on a 4-/8-bit base means re-quantizing them, and a "
            "small ΔW is mostly lost in that rounding (one 4-bit step is ~1/8 of a block's largest weight). Use "
            "trainer.restart.every_steps=0 on a quantized base, or model.quantization=none for restarts"
        )
    ]


# ----------------------------------------------------------------------------------------------
# Optimizer


def operator_at(settings: RestartConfig, restarts_done: int) -> str | int | None:
    """The operator pair the layers use after `restarts_done` restarts (None: the method has no cycle)."""
    return settings.mora_types[restarts_done % len(settings.mora_types)] if settings.mora_types else None


def drop_optimizer_state(optimizer: Any, params: list[nn.Parameter]) -> int:
    """Forget the optimizer state (moments, step count) of `params`; returns how many had state."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    dropped = 0
    for param in params:
        if inner.state.pop(param, None) is not None:
            dropped += 1
    return dropped


# ----------------------------------------------------------------------------------------------
# Learning rate


def restart_lr_factor(settings: RestartConfig, step: int, base_factor: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based, as LambdaLR counts)."""
    T, warmup = settings.every_steps, settings.warmup_steps
    since = step % T
    if settings.lr_schedule == "cosine_restarts":
        if since < warmup:
            return (since + 1) / (warmup + 1)
        progress = (since - warmup) / max(1, T - warmup)
        return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < T or warmup == 0:  # jagged: the first cycle uses the trainer's own warm-up
        return base_factor
    return base_factor * min(1.0, (since + 1) / (warmup + 1))


def wrap_scheduler(scheduler: Any, settings: RestartConfig) -> None:
    """Make a LambdaLR scheduler restart its warm-up every `every_steps` steps (in place).

    Plain closures (not objects) so the scheduler's state_dict stays tensor-only for weights_only loads.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    if not hasattr(inner, "lr_lambdas"):
        raise MoraTrainError(
            f"trainer.restart needs a step-based learning-rate schedule (cosine, linear, constant, ...), "
            f"not {type(inner).__name__}; change trainer.lr_scheduler"
        )

    def wrap(fn: Any) -> Any:
        if getattr(fn, "restart_wrapped", False):
            return fn

        def factor(step: int) -> float:
            return restart_lr_factor(settings, step, fn(step))

        # Marked on the function, not the scheduler: the scheduler's state_dict saves its attributes and a
        # resumed run would load such a flag before wrapping its fresh scheduler.
        factor.restart_wrapped = True  # type: ignore[attr-defined]
        return factor

    inner.lr_lambdas = [wrap(fn) for fn in inner.lr_lambdas]


# ----------------------------------------------------------------------------------------------
# Trained embeddings / head


def embedding_parameters(model: PreTrainedModel) -> dict[str, nn.Parameter]:
    """Input embeddings and LM head weights (once if tied)."""
    found: dict[str, nn.Parameter] = {}
    for name, module in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if module is not None and all(module.weight is not p for p in found.values()):
            # transformers types these as plain Modules; their weight is an nn.Embedding's / nn.Linear's Parameter.
            found[name] = cast(nn.Parameter, module.weight)
    return found


# ----------------------------------------------------------------------------------------------
# Checkpoint state


class BaseWeightsState:
    """What an adapter-only checkpoint misses: weights changed by restarts or trained directly.

    `save(dir)` writes them into a checkpoint folder; `load(dir)` restores them (both called by
    AdapterTrainer with the adapter's own save/load).
    """

    def __init__(self, adapter: Adapter, settings: RestartConfig, train_embeddings: bool) -> None:
        self.adapter, self.settings = adapter, settings
        self.tensors: dict[str, torch.Tensor] = {}
        if settings.every_steps > 0:
            for name, weight in restartable(adapter).adapted_base_weights().items():
                self.tensors[f"{name}.weight"] = weight
        if train_embeddings:
            for name, param in embedding_parameters(adapter.base_model).items():
                self.tensors[f"{name}.weight"] = param
        self.restarts_done = 0

    def save(self, directory: Path) -> None:
        tensors = {k: t.detach().cpu().contiguous().clone() for k, t in self.tensors.items()}
        save_file(tensors, str(Path(directory) / BASE_WEIGHTS_NAME), metadata={"format": "pt"})
        state = {
            "restarts_done": self.restarts_done,
            "every_steps": self.settings.every_steps,
            "mora_types": operator_types(self.adapter),
        }
        write_json_atomically(Path(directory) / RESTART_STATE_NAME, state)

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        weights_path, state_path = Path(directory) / BASE_WEIGHTS_NAME, Path(directory) / RESTART_STATE_NAME
        if not weights_path.is_file() or not state_path.is_file():
            raise MoraTrainError(
                f"checkpoint {directory} has no {BASE_WEIGHTS_NAME}/{RESTART_STATE_NAME}, which this run needs "
                "(trainer.restart or trainer.train_embeddings is on): it was written with other training settings; "
                "resume with those, or start over with trainer.resume=false overwrite=true"
            )
        saved = load_file(str(weights_path))
        missing = sorted(set(self.tensors) - set(saved))
        if missing:
            raise MoraTrainError(
                f"checkpoint {directory} lacks base weights {missing[:5]}; it was written with other adapter settings"
            )
        for key, tensor in self.tensors.items():
            if saved[key].shape != tensor.shape:
                raise MoraTrainError(
                    f"checkpoint {directory}: {key} has shape {tuple(saved[key].shape)}, model {tuple(tensor.shape)}"
                )
            tensor.data.copy_(saved[key].to(dtype=tensor.dtype, device=tensor.device))
        state = json.loads(state_path.read_text())
        self.restarts_done = int(state["restarts_done"])
        # Every layer switches together, so one saved operator describes them all.
        saved_types = set(state.get("mora_types", {}).values())
        if saved_types:
            operator_switching(self.adapter).set_operator(saved_types.pop())


# ----------------------------------------------------------------------------------------------
# The callback


class RestartCallback(TrainerCallback):
    """Merge, re-initialise, switch operators, drop adapter optimizer state every `every_steps` steps."""

    def __init__(self, adapter: Adapter, settings: RestartConfig, state: BaseWeightsState, seed: int) -> None:
        self.adapter, self.settings, self.state, self.seed = adapter, settings, state, seed
        self.params = restartable(adapter).restart_parameters()

    def on_train_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if lr_scheduler is None:
            return
        wrap_scheduler(lr_scheduler, self.settings)
        if state.global_step == 0:
            # The scheduler already set step 0's rate with the unwrapped schedule; set it again.
            inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
            for group, base_lr, fn in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas, strict=True):
                group["lr"] = base_lr * fn(0)
            inner._last_lr = [g["lr"] for g in inner.optimizer.param_groups]

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        step, T = state.global_step, self.settings.every_steps
        if step % T or step >= state.max_steps:
            return
        self.restart(optimizer, step // T)

    def restart(self, optimizer: Any, restart_index: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + restart_index)
        restartable(self.adapter).fold_and_reset(generator)
        kind = operator_at(self.settings, restart_index)
        if kind is not None:
            operator_switching(self.adapter).set_operator(kind)
        dropped = drop_optimizer_state(optimizer, self.params) if optimizer is not None else 0
        self.state.restarts_done = restart_index
        log.info(
            "restart %d: merged ΔW, re-initialised the adapter, dropped optimizer state of %d tensors",
            restart_index,
            dropped,
        )


@dataclass
class TrainingExtras:
    """Callbacks and checkpoint state an adapter's options add to training (empty when none are on)."""

    callbacks: list[TrainerCallback] = field(default_factory=list)
    checkpoint_state: list[BaseWeightsState] = field(default_factory=list)


def setup_training_extras(adapter: Adapter, trainer: TrainerConfig, seed: int) -> TrainingExtras:
    """Apply trainer.train_embeddings and trainer.restart to a built adapter (validation refuses restarts for
    methods without adapter weights to restart)."""
    settings, train_embeddings = trainer.restart, trainer.train_embeddings
    extras = TrainingExtras()
    if settings.every_steps <= 0 and not train_embeddings:
        return extras
    if train_embeddings:
        for param in embedding_parameters(adapter.base_model).values():
            param.requires_grad_(True)
    state = BaseWeightsState(adapter, settings, train_embeddings)
    extras.checkpoint_state.append(state)
    if settings.every_steps > 0:
        if settings.mora_types:
            # Every operator pair of the cycle must fit every layer: try each now, not at restart 3 of 5.
            for kind in [*settings.mora_types[1:], settings.mora_types[0]]:
                operator_switching(adapter).set_operator(kind)
        extras.callbacks.append(RestartCallback(adapter, settings, state, seed))
    return extras

"""Periodic merge-and-restart of an adapter (ReMoRA for MoRA, ReLoRA for LoRA), and trained base weights.

Every `adapter.restart.every_steps` = T optimizer steps (T, 2T, ... but not after the last step):

1. merge ΔW into the base weights (float32 maths, checked finite);
2. re-initialise the adapter: MoRA M = 0; LoRA A random (kaiming-uniform, as peft), B = 0;
3. MoRA only: switch the operator pair to the next entry of `adapter.restart.mora_types`
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
LM head when `adapter.train_embeddings=true`) and `restart_state.json` (restarts done and the
operator type of every MoRA layer), and loads both on resume: a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from mora_train.adapters import Adapter
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically

log = logging.getLogger(__name__)

LR_SCHEDULES = ("jagged", "cosine_restarts")
RESTART_KEYS = ("every_steps", "warmup_steps", "lr_schedule", "min_lr_ratio", "mora_types")
BASE_WEIGHTS_NAME = "base_weights.safetensors"
RESTART_STATE_NAME = "restart_state.json"


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class RestartSettings:
    every_steps: int = 0  # 0: no restarts
    warmup_steps: int = 0
    lr_schedule: str = "jagged"
    min_lr_ratio: float = 0.1
    # Operator pairs cycled at each restart (methods with operators, i.e. MoRA); None: keep the one in use.
    mora_types: list[str | int] | None = None


def restart_problems(adapter_cfg: Any, quantization: str = "none") -> list[str]:
    """Problems of adapter.restart and adapter.train_embeddings (the keys every method with restarts shares).

    `quantization`: model.quantization. Restarts fold ΔW into the base weights; a 4-/8-bit base would have
    to be re-quantized at every restart, losing most of each small ΔW, so the combination is refused."""
    if not isinstance(adapter_cfg, DictConfig) or "restart" not in adapter_cfg and "train_embeddings" not in adapter_cfg:
        return []
    problems: list[str] = []
    restart_section = adapter_cfg.get("restart")
    every_steps = restart_section.get("every_steps", 0) if isinstance(restart_section, DictConfig) else 0
    if quantization != "none" and isinstance(every_steps, int) and not isinstance(every_steps, bool) and every_steps > 0:
        problems.append(
            f"`adapter.restart.every_steps={every_steps}` (ReMoRA/ReLoRA) with `model.quantization={quantization}`: "
            "each restart folds ΔW into the base weights, which on a 4-/8-bit base means re-quantizing them, and a "
            "small ΔW is mostly lost in that rounding (one 4-bit step is ~1/8 of a block's largest weight). Use "
            "adapter.restart.every_steps=0 on a quantized base, or model.quantization=none for restarts"
        )
    train_embeddings = adapter_cfg.get("train_embeddings", False)
    if not isinstance(train_embeddings, bool):
        problems.append(f"`adapter.train_embeddings={train_embeddings!r}` must be true or false")
    restart = adapter_cfg.get("restart")
    if restart is None:
        return problems
    if not isinstance(restart, DictConfig):
        return problems + [f"`adapter.restart` must be a mapping with keys {', '.join(RESTART_KEYS)}"]
    for key in restart:
        if key not in RESTART_KEYS:
            problems.append(f"`adapter.restart.{key}` is not a known key; known keys: {', '.join(RESTART_KEYS)}")
    every, warmup = restart.get("every_steps", 0), restart.get("warmup_steps", 0)
    for key, value in (("every_steps", every), ("warmup_steps", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"`adapter.restart.{key}={value!r}` must be a non-negative integer")
    if isinstance(every, int) and isinstance(warmup, int) and every > 0 and warmup >= every:
        problems.append(
            f"`adapter.restart.warmup_steps={warmup}` must be smaller than `adapter.restart.every_steps={every}` "
            "(the re-warm-up happens inside each cycle)"
        )
    schedule = restart.get("lr_schedule", "jagged")
    if schedule not in LR_SCHEDULES:
        problems.append(f"`adapter.restart.lr_schedule={schedule}` is unknown; use one of {', '.join(LR_SCHEDULES)}")
    ratio = restart.get("min_lr_ratio", 0.1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        problems.append(f"`adapter.restart.min_lr_ratio={ratio!r}` must be a number in [0, 1]")
    return problems


def restart_settings(adapter_cfg: DictConfig) -> RestartSettings:
    """The restart settings; `mora_types` stays as written (the adapter resolves operator names)."""
    restart = adapter_cfg.get("restart")
    if restart is None:
        return RestartSettings()
    values = OmegaConf.to_container(restart, resolve=True)
    return RestartSettings(**{k: v for k, v in values.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Optimizer


def operator_at(settings: RestartSettings, restarts_done: int) -> str | int | None:
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


def restart_lr_factor(settings: RestartSettings, step: int, base_factor: float) -> float:
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


def wrap_scheduler(scheduler: Any, settings: RestartSettings) -> None:
    """Make a LambdaLR scheduler restart its warm-up every `every_steps` steps (in place).

    Plain closures (not objects) so the scheduler's state_dict stays tensor-only for weights_only loads.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    if not hasattr(inner, "lr_lambdas"):
        raise MoraTrainError(
            f"adapter.restart needs a step-based learning-rate schedule (cosine, linear, constant, ...), "
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


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Input embeddings and LM head weights (once if tied)."""
    found: dict[str, nn.Parameter] = {}
    for name, module in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if module is not None and all(module.weight is not p for p in found.values()):
            found[name] = module.weight
    return found


# ----------------------------------------------------------------------------------------------
# Checkpoint state


class BaseWeightsState:
    """What an adapter-only checkpoint misses: weights changed by restarts or trained directly.

    `save(dir)` writes them into a checkpoint folder; `load(dir)` restores them (both called by
    AdapterTrainer with the adapter's own save/load).
    """

    def __init__(self, adapter: Adapter, settings: RestartSettings, train_embeddings: bool) -> None:
        self.adapter, self.settings = adapter, settings
        self.tensors: dict[str, torch.Tensor] = {}
        if settings.every_steps > 0:
            for name, weight in adapter.adapted_base_weights().items():
                self.tensors[f"{name}.weight"] = weight
        if train_embeddings:
            for name, param in embedding_parameters(adapter.base_model).items():
                self.tensors[f"{name}.weight"] = param
        self.restarts_done = 0

    def save(self, directory: Path) -> None:
        tensors = {k: t.detach().cpu().contiguous().clone() for k, t in self.tensors.items()}
        save_file(tensors, str(Path(directory) / BASE_WEIGHTS_NAME), metadata={"format": "pt"})
        state = {"restarts_done": self.restarts_done, "every_steps": self.settings.every_steps,
                 "mora_types": self.adapter.operator_types()}
        write_json_atomically(Path(directory) / RESTART_STATE_NAME, state)

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        weights_path, state_path = Path(directory) / BASE_WEIGHTS_NAME, Path(directory) / RESTART_STATE_NAME
        if not weights_path.is_file() or not state_path.is_file():
            raise MoraTrainError(
                f"checkpoint {directory} has no {BASE_WEIGHTS_NAME}/{RESTART_STATE_NAME}, which this run needs "
                "(adapter.restart or adapter.train_embeddings is on): it was written with other adapter settings; "
                "resume with those, or start over with trainer.resume=false overwrite=true"
            )
        saved = load_file(str(weights_path))
        missing = sorted(set(self.tensors) - set(saved))
        if missing:
            raise MoraTrainError(f"checkpoint {directory} lacks base weights {missing[:5]}; it was written with other adapter settings")
        for key, tensor in self.tensors.items():
            if saved[key].shape != tensor.shape:
                raise MoraTrainError(f"checkpoint {directory}: {key} has shape {tuple(saved[key].shape)}, model {tuple(tensor.shape)}")
            tensor.data.copy_(saved[key].to(dtype=tensor.dtype, device=tensor.device))
        state = json.loads(state_path.read_text())
        self.restarts_done = int(state["restarts_done"])
        # Every layer switches together, so one saved operator describes them all.
        saved_types = set(state.get("mora_types", {}).values())
        if saved_types:
            self.adapter.set_operator(saved_types.pop())


# ----------------------------------------------------------------------------------------------
# The callback


class RestartCallback(TrainerCallback):
    """Merge, re-initialise, switch operators, drop adapter optimizer state every `every_steps` steps."""

    def __init__(self, adapter: Adapter, settings: RestartSettings, state: BaseWeightsState, seed: int) -> None:
        self.adapter, self.settings, self.state, self.seed = adapter, settings, state, seed
        self.params = adapter.restart_parameters()

    def on_train_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if lr_scheduler is None:
            return
        wrap_scheduler(lr_scheduler, self.settings)
        if state.global_step == 0:
            # The scheduler already set step 0's rate with the unwrapped schedule; set it again.
            inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
            for group, base_lr, fn in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
                group["lr"] = base_lr * fn(0)
            inner._last_lr = [g["lr"] for g in inner.optimizer.param_groups]

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        step, T = state.global_step, self.settings.every_steps
        if step % T or step >= state.max_steps:
            return
        self.restart(optimizer, step // T)

    def restart(self, optimizer: Any, restart_index: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + restart_index)
        self.adapter.fold_and_reset(generator)
        kind = operator_at(self.settings, restart_index)
        if kind is not None:
            self.adapter.set_operator(kind)
        dropped = drop_optimizer_state(optimizer, self.params) if optimizer is not None else 0
        self.state.restarts_done = restart_index
        log.info("restart %d: merged ΔW, re-initialised the adapter, dropped optimizer state of %d tensors",
                 restart_index, dropped)


@dataclass
class TrainingExtras:
    """Callbacks and checkpoint state an adapter's options add to training (empty when none are on)."""

    callbacks: list[TrainerCallback] = field(default_factory=list)
    checkpoint_state: list[BaseWeightsState] = field(default_factory=list)


def setup_training_extras(adapter: Adapter, adapter_cfg: DictConfig, seed: int) -> TrainingExtras:
    """Apply adapter.train_embeddings and adapter.restart to a built adapter (config keys only methods with
    restarts have; validation refuses them for the others)."""
    settings = restart_settings(adapter_cfg)
    train_embeddings = bool(adapter_cfg.get("train_embeddings", False))
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
                adapter.set_operator(kind)
        extras.callbacks.append(RestartCallback(adapter, settings, state, seed))
    return extras

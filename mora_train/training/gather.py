"""After training: gather full weights from ZeRO / FSDP shards and check DDP replicas.

Every rank calls `collect_final_weights` right after `Trainer.train()` (it runs collectives); rank 0 then
rebuilds the model from them for export (export.gather.unsharded_adapter).
"""

from __future__ import annotations

import gc
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mora_train.core.errors import MoraTrainError
from mora_train.training.distributed import all_gather_object, is_main_process, world_size

if TYPE_CHECKING:
    from transformers import Trainer

log = logging.getLogger(__name__)


@dataclass
class FinalWeights:
    """What all ranks learn about the trained weights, collected right after training."""

    engine: str  # single | ddp | deepspeed-zero<N> | fsdp<N>
    world_size: int
    # Rank 0 only: full fp32 CPU copies of every trainable parameter, when the live ones are sharded or
    # kept in low precision by the engine (DeepSpeed, FSDP); None when the live model is the exact result.
    trainable_state: dict[str, torch.Tensor] | None
    # One digest of the trainable weights per rank, when every rank holds a full replica (DDP, ZeRO-1/2).
    replica_checksums: list[str] | None
    device: str  # where rank 0 trained, to put the rebuilt model for export and evaluation
    peak_gpu_memory_gib: float | None = None  # the largest peak of allocated CUDA memory over the ranks

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "world_size": self.world_size,
            "replica_checksums": self.replica_checksums,
            "peak_gpu_memory_gib": self.peak_gpu_memory_gib,
        }


def engine_name(trainer: Trainer) -> str:
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    return "ddp" if world_size() > 1 else "single"


def _strip_wrapper_names(name: str) -> str:
    for token in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(token, "")
    return name


def unwrapped_named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's parameters by the names the unwrapped model gives them (no FSDP, checkpoint or compile
    wrapper names): the keys of the gathered state."""
    return {_strip_wrapper_names(name): param for name, param in module.named_parameters()}


def _trained_model(trainer: Trainer) -> torch.nn.Module:
    # Trainer.model is None only before a model_init builds one; gathering runs after training, with the model set.
    assert trainer.model is not None
    return trainer.model


def _gather_deepspeed(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor] | None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = unwrapped_named_parameters(module)
    state: dict[str, torch.Tensor] = {}
    for name in names:  # the same order on every rank: each step is a collective under ZeRO-3
        param = params[name]
        # The optimizer's fp32 master copy (exact even when the module trains in bf16/fp16), all-gathered.
        full = safe_get_full_fp32_param(param)
        if full is None:  # no master copy (e.g. fp32 ZeRO-0): gather the module's own (a no-op unless ZeRO-3)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach().clone()
        if is_main_process():
            state[name] = full.detach().to(torch.float32).cpu().clone()
    return state if is_main_process() else None


def _gather_fsdp(trainer: Trainer, names: list[str]) -> dict[str, torch.Tensor] | None:
    if trainer.accelerator.state.fsdp_plugin.fsdp_version == 2:
        from torch.distributed.tensor import DTensor

        params = unwrapped_named_parameters(_trained_model(trainer))
        state = {}
        for name in names:  # full_tensor() is an all-gather: same order on every rank
            param = params[name]
            full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            if is_main_process():
                state[name] = full.detach().to(torch.float32).cpu().clone()
        return state if is_main_process() else None
    # FSDP1: flattened shards; Accelerate gathers a full state dict onto rank 0 (CPU).
    full_state = trainer.accelerator.get_state_dict(trainer.model)
    if not is_main_process():
        return None
    cleaned = {_strip_wrapper_names(k): v for k, v in full_state.items()}
    missing = [n for n in names if n not in cleaned]
    if missing:
        raise MoraTrainError(
            f"FSDP state dict lacks trainable weights {missing[:5]}; please report this with the run's config"
        )
    return {n: cleaned[n].detach().to(torch.float32).cpu().clone() for n in names}


def gather_trainable_state(trainer: Trainer, names: list[str]) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU copies of the named trainable parameters on rank 0 (None elsewhere).

    A collective under DeepSpeed and FSDP: every rank must call it. Never returns a [0]-shaped shard.
    """
    if trainer.is_deepspeed_enabled:
        state = _gather_deepspeed(_trained_model(trainer), names)
    elif trainer.is_fsdp_enabled:
        state = _gather_fsdp(trainer, names)
    else:
        params = unwrapped_named_parameters(trainer.accelerator.unwrap_model(trainer.model))
        state = {n: params[n].detach().to(torch.float32).cpu().clone() for n in names} if is_main_process() else None
    if state is not None:
        empty = [n for n, t in state.items() if t.numel() == 0]
        if empty:
            raise MoraTrainError(f"gathered empty tensors for {empty[:5]}; please report this with the run's config")
    return state


def weights_checksum(module: torch.nn.Module, names: list[str]) -> str:
    """sha256 over the bytes of the named parameters (exact: any differing bit changes it)."""
    params = unwrapped_named_parameters(module)
    digest = hashlib.sha256()
    for name in names:
        tensor = params[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def collect_final_weights(trainer: Trainer, names: list[str]) -> FinalWeights:
    """Every rank calls this right after training (it runs collectives)."""
    engine = engine_name(trainer)
    sharded_or_low_precision = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    state = gather_trainable_state(trainer, names) if sharded_or_low_precision else None
    checksums = None
    replicated = engine == "ddp" or (
        engine in ("deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2") and world_size() > 1
    )
    if replicated:
        checksums = all_gather_object(weights_checksum(trainer.accelerator.unwrap_model(trainer.model), names))
    device = str(trainer.args.device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if world_size() > 1 and peak is not None:
        peak = max(all_gather_object(peak))
    if sharded_or_low_precision:
        # Rank 0 rebuilds an unsharded copy for export: free the engine's buffers and stop transformers
        # from loading that copy under ZeRO-3's zero.Init (a collective the other ranks would not join).
        trainer.accelerator.free_memory()
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return FinalWeights(engine, world_size(), state, checksums, device, peak)

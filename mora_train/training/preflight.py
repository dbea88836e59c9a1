"""Checks that need the loaded base model, run before the adapter is built and before any training.

pipeline.validate catches what the config alone shows (in a second, before a model download); this
catches what needs the model's layers, all reported in one ConfigError: target_modules that name no
layer (listing the names that exist), a rank the chosen MoRA type cannot serve for some layer, not
enough free disk for what the run will write (the merged checkpoint above all), and packing (trainer.packing)
with an attention that would let packed examples see each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from mora_train.adapters import adapter_type
from mora_train.adapters.base import count_parameters, linear_layer_names, match_target_linears
from mora_train.adapters.config import AdapterSettings
from mora_train.core.errors import ConfigError
from mora_train.core.run_dir import RunDir
from mora_train.models.attention import packing_problem
from mora_train.models.config import ModelConfig
from mora_train.models.quantization import compute_dtype
from mora_train.training.config import TrainerConfig
from mora_train.training.resilience import format_bytes, free_bytes

log = logging.getLogger(__name__)

# Logs, TensorBoard events, predictions, tokenizer files: small, but not nothing.
SMALL_FILES_BYTES = 32 << 20
ADAM_STATES_PER_PARAM = 2  # exp_avg and exp_avg_sq, in the parameter's dtype


def _model_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) with tied weights counted once, as save_pretrained writes them."""
    seen: set[int] = set()
    count = size = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            count += param.numel()
            size += param.numel() * param.element_size()
    return count, size


def _method_rank(rank: int | None) -> int:
    # None only for a method that ignores the rank (adapter=full): the config check refused a missing rank for
    # every method that uses one (adapter_config_problems), so the adapters' `rank: int` holds where it is read.
    return cast(int, rank)


@dataclass(frozen=True)
class PlannedRun:
    """What the checks against the loaded model read of the run's config."""

    model_cfg: ModelConfig
    trainer: TrainerConfig
    adapter: AdapterSettings
    rank: int | None
    output_dir: Path
    export_dtype: torch.dtype | None  # the merged checkpoint's (export.dtype; None: the dtype the model computed in)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def estimate_run_bytes(model: nn.Module, layers: dict[str, nn.Linear], run: PlannedRun) -> dict[str, int]:
    """Bytes the run will still write: merged checkpoint, adapter folder, training checkpoints, small files."""
    parameters, merged = _model_bytes(model)
    element = next(model.parameters()).element_size()
    if run.model_cfg.is_quantized:
        # The merged checkpoint is de-quantized: every weight at export.dtype (default the compute dtype), not
        # the packed 4-/8-bit codes in memory; adapters train in float32 beside them.
        parameters = count_parameters(model)[1]  # packed 4-bit weights at their unquantized size
        merged = parameters * (run.export_dtype or compute_dtype(model)).itemsize
        element = 4
    count = adapter_type(run.adapter).trainable_count(model, layers, run.adapter, _method_rank(run.rank))
    trainable = count * element
    # A checkpoint holds the trained weights and their two AdamW moments.
    checkpoint = trainable + ADAM_STATES_PER_PARAM * trainable
    # RUN_DIR/adapter is not written when it would only repeat merged/ (every weight trained).
    whole_model = count >= parameters
    checkpoints = 0
    if run.trainer.save_steps > 0:
        saves = max(run.trainer.max_steps, 0) // run.trainer.save_steps or 1
        limit = run.trainer.save_total_limit
        # One more than the limit exists for a moment: the new one is published before the oldest is deleted.
        kept = saves if limit is None else min(saves, limit + 1)
        existing = _dir_bytes(RunDir(run.output_dir).checkpoints)
        checkpoints = max(kept * checkpoint - existing, 0)
    return {
        "merged checkpoint": merged,
        "adapter": 0 if whole_model else trainable,
        "training checkpoints": checkpoints,
        "logs and small files": SMALL_FILES_BYTES,
    }


def disk_problem(parts: dict[str, int], output_dir: Path) -> str | None:
    """Not enough free disk under `output_dir` for the parts `estimate_run_bytes` counted."""
    needed, free = sum(parts.values()), free_bytes(Path(output_dir))
    if free >= needed:
        return None
    detail = ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)
    return (
        f"not enough free disk for `output_dir={output_dir}`: this run will write about {format_bytes(needed)} "
        f"({detail}) but only {format_bytes(free)} is free there. Free some space, point output_dir at a bigger "
        "disk, or write fewer checkpoints (trainer.save_total_limit, trainer.save_steps)"
    )


def model_fit_problems(model: nn.Module, run: PlannedRun) -> list[str]:
    """Every way the adapter and trainer settings do not fit this model or this disk, one message each."""
    problems: list[str] = []
    targets = run.adapter.target_modules
    if isinstance(targets, str):  # "all" (full fine-tuning)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unmatched: list[str] = []
    else:
        layers, unmatched = match_target_linears(model, list(targets))
    if unmatched:
        problems.append(
            f"`adapter.target_modules`: {unmatched} match no linear layer of this model; its linear layers are "
            f"named {linear_layer_names(model)}: set adapter.target_modules to some of those"
        )
    if not unmatched:
        problems.extend(adapter_type(run.adapter).layer_problems(layers, run.adapter, _method_rank(run.rank)))
    problem = disk_problem(estimate_run_bytes(model, layers, run), run.output_dir)
    if problem:
        problems.append(problem)
    packing = packing_problem(model) if run.trainer.packing else None
    if packing:
        problems.append(packing)
    return problems


def check_model_fit(model: nn.Module, run: PlannedRun) -> None:
    """ConfigError listing every problem of `model_fit_problems` (none: return)."""
    problems = model_fit_problems(model, run)
    if problems:
        raise ConfigError(problems)

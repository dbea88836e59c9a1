"""Checks that need the loaded base model, run before the adapter is built and before any training.

config.validate() catches what the config alone shows (in a second, before a model download); this
catches what needs the model's layers, all reported in one ConfigError: target_modules that name no
layer (listing the names that exist), a rank the chosen MoRA type cannot serve for some layer, and not
enough free disk for what the run will write (the merged checkpoint above all).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mora_train.adapters import adapter_type
from mora_train.adapters.base import count_parameters, linear_layer_names, match_target_linears
from mora_train.config.validation import export_dtype
from mora_train.core.errors import ConfigError
from mora_train.models.quantization import compute_dtype, is_quantized
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


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def estimate_run_bytes(cfg: DictConfig, model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, int]:
    """Bytes the run will still write: merged checkpoint, adapter folder, training checkpoints, small files."""
    parameters, merged = _model_bytes(model)
    element = next(model.parameters()).element_size()
    if is_quantized(model):
        # The merged checkpoint is de-quantized: every weight at export.dtype (default the compute dtype), not
        # the packed 4-/8-bit codes in memory; adapters train in float32 beside them.
        parameters = count_parameters(model)[1]  # packed 4-bit weights at their unquantized size
        merged = parameters * (export_dtype(cfg) or compute_dtype(model)).itemsize
        element = 4
    method = adapter_type(cfg.adapter)
    count = method.trainable_count(model, layers, OmegaConf.to_container(cfg.adapter, resolve=True), cfg.rank)
    trainable = count * element
    # A checkpoint holds the trained weights and their two AdamW moments.
    checkpoint = trainable + ADAM_STATES_PER_PARAM * trainable
    # RUN_DIR/adapter is not written when it would only repeat merged/ (every weight trained).
    whole_model = count >= parameters
    trainer = cfg.trainer
    checkpoints = 0
    if trainer.save_steps > 0:
        saves = max(trainer.max_steps, 0) // trainer.save_steps or 1
        limit = trainer.save_total_limit
        # One more than the limit exists for a moment: the new one is published before the oldest is deleted.
        kept = saves if limit is None else min(saves, limit + 1)
        existing = _dir_bytes(Path(cfg.output_dir) / "checkpoints")
        checkpoints = max(kept * checkpoint - existing, 0)
    return {
        "merged checkpoint": merged,
        "adapter": 0 if whole_model else trainable,
        "training checkpoints": checkpoints,
        "logs and small files": SMALL_FILES_BYTES,
    }


def disk_problem(cfg: DictConfig, model: nn.Module, layers: dict[str, nn.Linear]) -> str | None:
    parts = estimate_run_bytes(cfg, model, layers)
    needed, free = sum(parts.values()), free_bytes(Path(cfg.output_dir))
    if free >= needed:
        return None
    detail = ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)
    return (
        f"not enough free disk for `output_dir={cfg.output_dir}`: this run will write about {format_bytes(needed)} "
        f"({detail}) but only {format_bytes(free)} is free there. Free some space, point output_dir at a bigger "
        "disk, or write fewer checkpoints (trainer.save_total_limit, trainer.save_steps)"
    )


def model_fit_problems(cfg: DictConfig, model: nn.Module) -> list[str]:
    """Every way `cfg` does not fit this model or this disk, one message each."""
    problems: list[str] = []
    adapter_cfg = cfg.adapter
    targets = adapter_cfg.target_modules
    if isinstance(targets, str):  # "all" (full fine-tuning)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unmatched: list[str] = []
    else:
        targets = list(OmegaConf.to_container(targets))
        layers, unmatched = match_target_linears(model, targets)
    if unmatched:
        problems.append(
            f"`adapter.target_modules`: {unmatched} match no linear layer of this model; its linear layers are "
            f"named {linear_layer_names(model)}: set adapter.target_modules to some of those"
        )
    if not unmatched:
        settings = OmegaConf.to_container(adapter_cfg, resolve=True)
        problems.extend(adapter_type(adapter_cfg).layer_problems(layers, settings, cfg.rank))
    problem = disk_problem(cfg, model, layers)
    if problem:
        problems.append(problem)
    return problems


def check_model_fit(cfg: DictConfig, model: nn.Module) -> None:
    problems = model_fit_problems(cfg, model)
    if problems:
        raise ConfigError(problems)

"""MoRA on a whole model: put a MoRALinear around every target layer; save, load, merge."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    Adapter,
    ModuleSummary,
    find_target_linears,
)
from mora_train.adapters.mora import MoRALinear, mora_shape_problem, resolve_mora_type
from mora_train.core.errors import ConfigError, MoraTrainError

FORMAT = "mora-train"
FORMAT_VERSION = 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mora_layer_problems(model: nn.Module, target_modules: list[str], rank: int, mora_type: str | int) -> list[str]:
    """Every target layer this rank/type cannot serve, as one message each (empty when all fit)."""
    problems = []
    for name, linear in find_target_linears(model, target_modules).items():
        problem = mora_shape_problem(name, linear.in_features, linear.out_features, rank, mora_type)
        if problem:
            problems.append(problem)
    return problems


class MoraAdapter(Adapter):
    name = "mora"

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int,
        mora_type: str | int,
        target_modules: list[str],
        dropout: float = 0.0,
        modules: dict[str, MoRALinear] | None = None,
    ) -> None:
        self.base_model = model
        self.rank, self.mora_type, self.dropout = rank, resolve_mora_type(mora_type), dropout
        self.target_modules = list(target_modules)
        if modules is None:
            problems = mora_layer_problems(model, self.target_modules, rank, self.mora_type)
            if problems:
                raise ConfigError(problems)
            model.requires_grad_(False)
            modules = {}
            for name, linear in find_target_linears(model, self.target_modules).items():
                layer = MoRALinear(linear, rank, self.mora_type, dropout=dropout, layer_name=name)
                _set_submodule(model, name, layer)
                modules[name] = layer
        self.modules = modules

    def module_summaries(self) -> list[ModuleSummary]:
        return [
            ModuleSummary(n, m.in_features, m.out_features, f"r̂={m.r_hat}", m.mora_M.numel())
            for n, m in self.modules.items()
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{n}.{k}": p for n, m in self.modules.items() for k, p in m.adapter_params().items()}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: m.delta_weight() for n, m in self.modules.items()}

    def merge_and_unload(self) -> PreTrainedModel:
        with torch.no_grad():
            for name, layer in self.modules.items():
                layer.merge()  # fp32 ΔW, checked finite
                _set_submodule(self.base_model, name, layer.base_layer)
        self.modules = {}
        return self.base_model

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter": "mora",
            "rank": self.rank,
            "mora_type": self.mora_type,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
            "base_model": getattr(self.base_model.config, "_name_or_path", None),
            "modules": {
                n: {"in_features": m.in_features, "out_features": m.out_features, "r_hat": m.r_hat}
                for n, m in self.modules.items()
            },
        }

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        directory = Path(directory)
        live = self.trainable_parameters()
        source = live if state_dict is None else {k: state_dict[k] for k in live}
        tensors = {k: p.detach().contiguous().cpu() for k, p in source.items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt", "adapter": "mora"})
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def load_weights(self, directory: Path) -> None:
        self.load_state(load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME)), str(directory))

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy saved M matrices into the live modules; every mismatch is named, nothing is copied on error."""
        live = self.trainable_parameters()
        problems = [f"{k}: missing from {source}" for k in live if k not in state]
        problems += [f"{k}: saved in {source} but this model has no such MoRA module" for k in state if k not in live]
        problems += [
            f"{k}: saved shape {tuple(state[k].shape)}, this model's is {tuple(live[k].shape)}"
            for k in live
            if k in state and state[k].shape != live[k].shape
        ]
        if problems:
            raise MoraTrainError(
                f"MoRA adapter from {source} does not fit this model (wrong base model, rank or target_modules?): "
                + "; ".join(problems[:8])
                + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            )
        with torch.no_grad():
            for key, param in live.items():
                param.copy_(state[key].to(dtype=param.dtype, device=param.device))

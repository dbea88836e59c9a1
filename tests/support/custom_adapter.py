"""A fine-tuning method defined outside mora_train/: ΔW = b aᵀ (rank one) on each target linear layer.

It uses only the adapter protocol and its helpers (mora_train.adapters.base), and is made known to mora-train
by `register_adapter`; tests/integration/test_custom_adapter.py trains, merges and exports it through the
normal pipeline. `a` starts random and `b` at zero, as LoRA's factors do, so training starts from the base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters import register_adapter
from mora_train.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    FORMAT,
    Adapter,
    ModuleSummary,
    copy_saved_weights,
    find_target_linears,
    settings_as,
)
from mora_train.adapters.capabilities import HasLoraFactors
from mora_train.adapters.config import AdapterSettings
from mora_train.config.schema import setting
from mora_train.core.io import write_json_atomically
from mora_train.models.quantization import set_submodule


class RankOneSettings(AdapterSettings):
    """adapter=rank_one: ΔW = b aᵀ per target layer (a test method)."""

    init_std: float = setting(default=0.02, help="standard deviation of a's random start")

    def check(self, prefix: str) -> list[str]:
        problems = super().check(prefix)
        if self.target_modules == "all":
            problems.append(f"`{prefix}.target_modules=all` must be a list of module names")
        if self.init_std <= 0:
            problems.append(f"`{prefix}.init_std={self.init_std:g}` must be positive")
        return problems


class RankOneLinear(nn.Module):
    """A frozen linear layer plus b (aᵀ x)."""

    def __init__(self, base: nn.Linear, init_std: float) -> None:
        super().__init__()
        self.base_layer = base
        self.a = nn.Parameter(torch.randn(base.in_features, dtype=torch.float32) * init_std)
        self.b = nn.Parameter(torch.zeros(base.out_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.a.dtype) @ self.a).unsqueeze(-1) * self.b
        return self.base_layer(x) + update.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return torch.outer(self.b, self.a).float()


class RankOneAdapter(HasLoraFactors, Adapter):
    name = "rank_one"
    settings_type = RankOneSettings

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        settings: AdapterSettings,
        rank: int | None,
        load_base: Callable[[], nn.Module] | None = None,
    ) -> RankOneAdapter:
        own = settings_as(RankOneSettings, settings)
        return cls(model, list(own.target_modules), own.init_std)

    @classmethod
    def identity(cls, settings: AdapterSettings, rank: int | None) -> dict[str, Any]:
        return {"adapter": cls.name}  # rank means nothing here

    @classmethod
    def trainable_count(
        cls, model: nn.Module, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int
    ) -> int:
        return sum(m.in_features + m.out_features for m in layers.values())

    def __init__(self, model: PreTrainedModel, target_modules: list[str], init_std: float) -> None:
        self.base_model, self.target_modules, self.init_std = model, target_modules, init_std
        model.requires_grad_(False)
        self.layers: dict[str, RankOneLinear] = {}
        for name, linear in find_target_linears(model, target_modules).items():
            layer = RankOneLinear(linear, init_std).to(linear.weight.device)
            set_submodule(model, name, layer)
            self.layers[name] = layer

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "adapter": self.name,
            "target_modules": self.target_modules,
            "init_std": self.init_std,
        }

    def identity_now(self) -> dict[str, Any]:
        return {"adapter": self.name}

    def module_summaries(self) -> list[ModuleSummary]:
        return [
            ModuleSummary(n, m.base_layer.in_features, m.base_layer.out_features, "r=1", m.a.numel() + m.b.numel())
            for n, m in self.layers.items()
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{n}.{k}": p for n, m in self.layers.items() for k, p in (("a", m.a), ("b", m.b))}

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        live = self.trainable_parameters()
        source = live if state_dict is None else {k: state_dict[k] for k in live}
        tensors = {k: p.detach().contiguous().cpu() for k, p in source.items()}
        save_file(tensors, str(Path(directory) / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json_atomically(Path(directory) / ADAPTER_CONFIG_NAME, self.describe())

    def load_weights(self, directory: Path) -> None:
        state = load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME))
        copy_saved_weights(self.trainable_parameters(), state, str(directory), "rank-one adapter", "wrong base?", "")

    @torch.no_grad()
    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {n: m.delta_weight() for n, m in self.layers.items()}

    @torch.no_grad()
    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.b.float().unsqueeze(1), m.a.float().unsqueeze(0)) for n, m in self.layers.items()}

    @torch.no_grad()
    def merge_and_unload(self) -> PreTrainedModel:
        for name, layer in self.layers.items():
            weight = layer.base_layer.weight
            weight.copy_((weight.float() + layer.delta_weight()).to(weight.dtype))
            set_submodule(self.base_model, name, layer.base_layer)
        self.layers = {}
        return self.base_model


def register() -> type[RankOneAdapter]:
    """Make adapter=rank_one known to mora-train (idempotent: register_adapter accepts the same class again)."""
    return register_adapter(RankOneAdapter)

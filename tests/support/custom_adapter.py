"""A fine-tuning method defined outside mora_train/: ΔW = b aᵀ (rank one) on each target linear layer.

It uses only the adapter and layer protocols and their helpers (mora_train.adapters.base, .layer): its layers
say ΔW, their parameters and LoRA factors, and merge, save, load and the LoRA export come from the protocol. It
is made known to mora-train by `register_adapter`; tests/integration/test_custom_adapter.py trains, merges and
exports it through the normal pipeline. `a` starts random and `b` at zero, as LoRA's factors do, so training
starts from the base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters import register_adapter
from mora_train.adapters.base import FORMAT, Adapter, find_target_linears, settings_as
from mora_train.adapters.capabilities import HasLoraFactors
from mora_train.adapters.config import AdapterSettings
from mora_train.adapters.layer import AdapterLayer
from mora_train.config.schema import setting
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


class RankOneLinear(AdapterLayer, nn.Module):
    """A frozen linear layer plus b (aᵀ x); merge, save, load and the LoRA export come from the protocol."""

    def __init__(self, name: str, base: nn.Linear, init_std: float) -> None:
        super().__init__()
        self.layer_name, self.base_layer = name, base
        self.a = nn.Parameter(torch.randn(base.in_features, dtype=torch.float32) * init_std)
        self.b = nn.Parameter(torch.zeros(base.out_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        update = (x.to(self.a.dtype) @ self.a).unsqueeze(-1) * self.b
        return self.base_layer(x) + update.to(x.dtype)

    def frozen_linear(self) -> nn.Linear:
        return self.base_layer

    def delta_weight(self) -> torch.Tensor:
        return torch.outer(self.b, self.a).float()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"a": self.a, "b": self.b}

    def size_label(self) -> str:
        return "r=1"

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b.float().unsqueeze(1), self.a.float().unsqueeze(0)


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
            layer = RankOneLinear(name, linear, init_std).to(linear.weight.device)
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

    def adapter_layers(self) -> dict[str, RankOneLinear]:
        return self.layers


def register() -> type[RankOneAdapter]:
    """Make adapter=rank_one known to mora-train (idempotent: register_adapter accepts the same class again)."""
    return register_adapter(RankOneAdapter)

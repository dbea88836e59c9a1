"""Full fine-tuning: every weight (or those of the named modules) trains; nothing to merge."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import Adapter, ModuleSummary, find_target_linears


class FullFineTune(Adapter):
    name = "full"

    def __init__(self, model: PreTrainedModel, target_modules: list[str] | str = "all") -> None:
        self.base_model = model
        self.target_modules = target_modules
        if target_modules == "all":
            for param in model.parameters():
                param.requires_grad_(True)
            self._modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        else:
            model.requires_grad_(False)
            self._modules = find_target_linears(model, list(target_modules))
            for module in self._modules.values():
                module.requires_grad_(True)

    def module_summaries(self) -> list[ModuleSummary]:
        return [
            ModuleSummary(name, m.in_features, m.out_features, "full", sum(p.numel() for p in m.parameters()))
            for name, m in self._modules.items()
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.base_model.named_parameters() if p.requires_grad}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError("full fine-tuning has no separate ΔW; compare the merged model with the base")

    def merge_and_unload(self) -> PreTrainedModel:
        return self.base_model

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        raise NotImplementedError("full fine-tuning saves the whole model (merged/), not an adapter")

    def load_weights(self, directory: Path) -> None:
        raise NotImplementedError("full fine-tuning checkpoints hold the whole model")

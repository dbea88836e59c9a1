"""What every adapter offers the trainer and the exporter, and how target layers are found."""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mora_train.core.errors import MoraTrainError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class ModuleSummary:
    """One adapted layer, as shown in the pre-training summary."""

    name: str
    d_in: int
    d_out: int
    size: str  # "r=8" (LoRA) or "r̂=96" (MoRA) or "full"
    trainable: int


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last-name components of the model's linear layers (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def match_target_linears(model: nn.Module, targets: list[str]) -> tuple[dict[str, nn.Linear], list[str]]:
    """(linear layers by full name whose name equals, or ends with `.` + an entry of targets; entries matching none).

    `q_proj` matches every `...self_attn.q_proj`; `layers.0.self_attn.q_proj` matches just that one.
    """
    found: dict[str, nn.Linear] = {}
    unmatched = list(targets)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for target in targets:
            if name == target or name.endswith("." + target):
                found[name] = module
                if target in unmatched:
                    unmatched.remove(target)
    return found, unmatched


def find_target_linears(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """match_target_linears, raising MoraTrainError (listing what could be named) when an entry matches nothing."""
    found, unmatched = match_target_linears(model, list(target_modules))
    if unmatched:
        raise MoraTrainError(
            f"adapter.target_modules entries {sorted(unmatched)} match no linear layer of this model; "
            f"its linear layers are named {linear_layer_names(model)} — set adapter.target_modules to some of those"
        )
    return found


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def write_dir_atomically(target: Path, write: Any) -> None:
    """Call write(tmp_dir), then rename tmp_dir to target: readers never see a half-written folder."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: give the space back, leave no debris
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomically(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class Adapter(ABC):
    """A base model plus trainable parameters, with one way to save, reload, merge and summarise them."""

    name: str
    base_model: PreTrainedModel

    @property
    def model(self) -> nn.Module:
        """The module the trainer optimises."""
        return self.base_model

    @abstractmethod
    def module_summaries(self) -> list[ModuleSummary]: ...

    @abstractmethod
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything that trains; checkpoints of lora/mora hold exactly these."""

    @abstractmethod
    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Module name -> ΔW (float32, d_out x d_in) for every adapted linear layer."""

    @abstractmethod
    def merge_and_unload(self) -> PreTrainedModel:
        """Fold ΔW into the base weights and return a plain transformers model (no adapter modules)."""

    @abstractmethod
    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter (weights + config) into an existing empty folder.

        `state_dict` (trainable-parameter name -> tensor) replaces the live weights, for engines whose live
        weights are shards (ZeRO-3, FSDP): the trainer gathers them first.
        """

    @abstractmethod
    def load_weights(self, directory: Path) -> None:
        """Load adapter weights saved by save(); errors name the module and shapes that disagree."""

    def to_json(self) -> dict[str, Any]:
        return {"adapter": self.name}

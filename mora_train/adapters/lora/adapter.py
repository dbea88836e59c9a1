"""LoRA through peft, behind the same Adapter protocol as MoRA."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import (
    ADAPTER_WEIGHTS_NAME,
    Adapter,
    find_target_linears,
    positive_rank,
    settings_as,
)
from mora_train.adapters.capabilities import HasLoraFactors, Restartable
from mora_train.adapters.config import AdapterSettings
from mora_train.adapters.layer import RestartableLayer
from mora_train.adapters.lora.config import LoraSettings
from mora_train.core.errors import MoraTrainError

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

log = logging.getLogger(__name__)

PEFT_ADAPTER = "default"


class _LoraFactor(Protocol):
    """A LoRA factor of a linear layer (peft's lora_A / lora_B entry: an nn.Linear)."""

    weight: nn.Parameter


class _LoraLinear(Protocol):
    """What this adapter uses of a peft LoRA layer on a linear base layer. peft's lora.Linear and its
    bitsandbytes variants all have it, but share only the LoraLayer mixin, which declares neither nn.Module's
    methods nor get_delta_weight, and types the base layer and the lora_A / lora_B entries as nn.Module."""

    r: dict[str, int]
    scaling: dict[str, float]
    lora_A: Mapping[str, _LoraFactor]
    lora_B: Mapping[str, _LoraFactor]

    merged_adapters: list[str]

    def get_base_layer(self) -> nn.Linear: ...
    def get_delta_weight(self, adapter: str) -> torch.Tensor: ...


class PeftLoraLayer(RestartableLayer):
    """The layer protocol over one of peft's LoRA layers: ΔW is peft's, merge adds it in float32 (peft's own
    merge on a bitsandbytes layer would re-quantize W + ΔW), and peft's `merged_adapters` follows ours, so its
    forward leaves the update out while merged."""

    def __init__(self, name: str, layer: _LoraLinear) -> None:
        self.layer_name, self.peft_layer = name, layer

    def label(self) -> str:
        return f"LoRA layer '{self.layer_name}'"

    @property
    def merged(self) -> bool:
        return PEFT_ADAPTER in self.peft_layer.merged_adapters

    @merged.setter
    def merged(self, value: bool) -> None:
        adapters = self.peft_layer.merged_adapters
        if value and PEFT_ADAPTER not in adapters:
            adapters.append(PEFT_ADAPTER)
        elif not value and PEFT_ADAPTER in adapters:
            adapters.remove(PEFT_ADAPTER)

    def frozen_linear(self) -> nn.Linear:
        return self.peft_layer.get_base_layer()

    def delta_weight(self) -> torch.Tensor:
        return self.peft_layer.get_delta_weight(PEFT_ADAPTER).float()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {
            f"lora_A.{PEFT_ADAPTER}.weight": self.peft_layer.lora_A[PEFT_ADAPTER].weight,
            f"lora_B.{PEFT_ADAPTER}.weight": self.peft_layer.lora_B[PEFT_ADAPTER].weight,
        }

    def size_label(self) -> str:
        return f"r={self.peft_layer.r[PEFT_ADAPTER]}"

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.peft_layer
        B = layer.lora_B[PEFT_ADAPTER].weight.float() * layer.scaling[PEFT_ADAPTER]  # exported scaling is 1
        return B, layer.lora_A[PEFT_ADAPTER].weight.float()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        # peft's own initialisation (kaiming-uniform A, zero B), from a generator so that it is reproducible.
        nn.init.kaiming_uniform_(self.peft_layer.lora_A[PEFT_ADAPTER].weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.peft_layer.lora_B[PEFT_ADAPTER].weight)


class LoraAdapter(Restartable, HasLoraFactors, Adapter):
    settings_type = LoraSettings
    name = "lora"

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        settings: AdapterSettings,
        rank: int | None,
        load_base: Callable[[], nn.Module] | None = None,
    ) -> LoraAdapter:
        lora = settings_as(LoraSettings, settings)
        return cls(model, positive_rank(rank), lora.alpha, lora.target_names, lora.dropout)

    @classmethod
    def reads(cls, config: dict[str, Any]) -> bool:
        """peft's LoRA folders (the official MoRA fork's are LoRA folders too, marked `use_mora`: MoRA reads those)."""
        return str(config.get("peft_type", "")).upper() == "LORA" and not config.get("use_mora")

    @classmethod
    def load(cls, model: PreTrainedModel, folder: Path, config: dict[str, Any]) -> LoraAdapter:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        return cls(
            model, config["r"], config["lora_alpha"], config["target_modules"], config["lora_dropout"], peft_model
        )

    @classmethod
    def layer_problems(cls, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int) -> list[str]:
        capped = sorted({n.rsplit(".", 1)[-1] for n, m in layers.items() if rank > min(m.in_features, m.out_features)})
        if capped:
            # Not an error (the paper compares LoRA and MoRA at r=256 on layers this narrow), but worth knowing.
            log.warning(
                "rank=%d exceeds min(d_in, d_out) of %s: LoRA's update there cannot reach that rank", rank, capped
            )
        return []

    @classmethod
    def trainable_count(
        cls, model: nn.Module, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int
    ) -> int:
        return sum(rank * (m.in_features + m.out_features) for m in layers.values())

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int,
        alpha: float,
        target_modules: list[str],
        dropout: float = 0.0,
        peft_model: PeftModel | None = None,
    ) -> None:
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        if peft_model is None:
            # Resolve names ourselves first so a typo gets our error (listing the layers), not peft's.
            targets = sorted(find_target_linears(model, list(target_modules)))
            config = LoraConfig(
                r=rank,
                # peft annotates lora_alpha as int, but takes any number: its scaling is lora_alpha / r.
                lora_alpha=alpha,  # type: ignore[arg-type]
                lora_dropout=dropout,
                target_modules=targets,
                bias="none",
                task_type="CAUSAL_LM",
            )
            peft_model = get_peft_model(model, config)
        self.peft_model = peft_model
        # peft types it nn.Module; for LoRA (not a prompt-learning method) it is the transformers model wrapped.
        self.base_model = cast(PreTrainedModel, peft_model.get_base_model())
        self.target_modules = list(target_modules)

    @property
    def model(self) -> nn.Module:
        return self.peft_model

    def title(self) -> str:
        return f"lora (rank {self.rank})"

    def identity_now(self) -> dict[str, Any]:
        return {"adapter": self.name, "rank": self.rank}

    def adapter_layers(self) -> dict[str, PeftLoraLayer]:
        # LoRA on linear layers (the targets find_target_linears picks): each has what _LoraLinear lists.
        return {
            n: PeftLoraLayer(n, cast(_LoraLinear, m))
            for n, m in self.base_model.named_modules()
            if isinstance(m, LoraLayer)
        }

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        # peft's names (what its save_pretrained picks from a gathered state_dict), and anything else training.
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def unload(self) -> PreTrainedModel:
        # peft's unload: puts every base layer back and drops its wrappers (the merge happened layer by layer).
        return cast(PreTrainedModel, self.peft_model.unload())

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # With state_dict, peft picks the LoRA entries from it instead of from the live (sharded) model.
        self.peft_model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)

    def load_weights(self, directory: Path) -> None:
        state = load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME))
        expected = {k: v.shape for k, v in self.peft_model.state_dict().items() if "lora_" in k}
        problems = []
        for key, tensor in state.items():
            live_key = key.replace(".weight", f".{PEFT_ADAPTER}.weight")
            if live_key in expected and expected[live_key] != tensor.shape:
                problems.append(f"{key}: saved {tuple(tensor.shape)}, model has {tuple(expected[live_key])}")
        if problems:
            raise MoraTrainError(f"LoRA adapter in {directory} does not fit this model: " + "; ".join(problems))
        # peft annotates its result as `namedtuple` (the factory, not a type); it is torch's load_state_dict result.
        result = cast("_IncompatibleKeys", set_peft_model_state_dict(self.peft_model, state))
        if result.unexpected_keys:
            raise MoraTrainError(
                f"LoRA adapter in {directory} names modules this model lacks: {sorted(result.unexpected_keys)[:5]}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
        }

"""One of peft's LoRA layers under the layer protocol (adapters/layer.py), DoRA's included.

Plain LoRA: ΔW = s B A (s = alpha / r, or alpha / sqrt(r) with rsLoRA). DoRA (peft's use_dora) is not an
additive low-rank update: peft computes, and merges, W' = (m / ||W + s B A||_row) ⊙ (W + s B A), with one
trained magnitude m_i per output row and the norm taken over each row of W + s B A (peft calls it the column
norm of Wᵀ). ΔW here is W' - W, built the way peft's merge builds W', so that merging it is peft's merge; its
rank is not bounded by r ((m / ||…|| - 1) ⊙ W is full-rank), so a DoRA layer has no LoRA factors of its own
(the LoRA export takes the SVD of ΔW at its numerical rank, as for MoRA's chunked types).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from mora_train.adapters.layer import RestartableLayer
from mora_train.models.quantization import dequantized_weight

PEFT_ADAPTER = "default"
# The key under which peft's own DoRA merge caches a merged layer's row norms (its unmerge reads it back).
DORA_NORM_KEY = f"{PEFT_ADAPTER}-weight_norm"
# Initialisations a restart (ReLoRA) can re-draw: A random, B zero, so ΔW = 0 again.
RESTARTABLE_INITS = ("default", "gaussian")


class _LoraFactor(Protocol):
    """A LoRA factor of a linear layer (peft's lora_A / lora_B entry: an nn.Linear); DoRA's magnitude entry."""

    weight: nn.Parameter


class PeftLoraLinear(Protocol):
    """What this adapter uses of a peft LoRA layer on a linear base layer. peft's lora.Linear and its
    bitsandbytes variants all have it, but share only the LoraLayer mixin, which declares neither nn.Module's
    methods nor get_delta_weight, and types the base layer and the lora_A / lora_B entries as nn.Module."""

    r: dict[str, int]
    scaling: dict[str, float]
    lora_A: Mapping[str, _LoraFactor]
    lora_B: Mapping[str, _LoraFactor]
    lora_magnitude_vector: Mapping[str, _LoraFactor]  # DoRA's m, one entry per DoRA adapter
    merged_adapters: list[str]
    _caches: dict[str, Any]

    def get_base_layer(self) -> nn.Linear: ...
    def get_delta_weight(self, adapter: str) -> torch.Tensor: ...


class PeftLoraLayer(RestartableLayer):
    """The layer protocol over one of peft's LoRA layers: ΔW is peft's (DoRA: W' - W of peft's DoRA merge), merge
    adds it in float32 (peft's own merge on a bitsandbytes layer would re-quantize W + ΔW), and peft's
    `merged_adapters` follows ours, so its forward leaves the update out while merged. `init` is how A and B
    were drawn (LoraSettings.init), which a restart draws again."""

    def __init__(self, name: str, layer: PeftLoraLinear, init: str = "default") -> None:
        self.layer_name, self.peft_layer, self.init = name, layer, init

    def label(self) -> str:
        return f"{'DoRA' if self.is_dora else 'LoRA'} layer '{self.layer_name}'"

    @property
    def is_dora(self) -> bool:
        return PEFT_ADAPTER in self.peft_layer.lora_magnitude_vector

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
        lora = self.peft_layer.get_delta_weight(PEFT_ADAPTER)
        lora = lora.to(torch.promote_types(lora.dtype, torch.float32))
        return self._dora_delta(lora) if self.is_dora else lora

    def _dora_delta(self, lora: torch.Tensor) -> torch.Tensor:
        """W' - W with W' = (m / ||W + s B A||_row) ⊙ (W + s B A), from the weight W the forward multiplies by
        (de-quantized on a 4-/8-bit base); while merged, W is taken back from W' with the row norms cached at
        the merge, as peft's unmerge does."""
        magnitude = self.peft_layer.lora_magnitude_vector[PEFT_ADAPTER].weight.detach().to(lora.dtype)
        weight = dequantized_weight(self.frozen_linear()).to(device=lora.device, dtype=lora.dtype)
        if self.merged:
            norm = self.peft_layer._caches[DORA_NORM_KEY].to(lora.dtype)
            weight = weight * (norm / magnitude)[:, None] - lora
        else:
            norm = torch.linalg.norm(weight + lora, dim=1)
        return (magnitude / norm)[:, None] * (weight + lora) - weight

    def merge(self) -> None:
        if self.is_dora and not self.merged:
            # The row norms of the unmerged W + s B A: what unmerge needs once W holds W'.
            with torch.no_grad():
                lora = self.peft_layer.get_delta_weight(PEFT_ADAPTER).float()
                weight = dequantized_weight(self.frozen_linear()).to(lora.device)
                self.peft_layer._caches[DORA_NORM_KEY] = torch.linalg.norm(weight + lora, dim=1)
        super().merge()

    def unmerge(self) -> None:
        was_merged = self.merged
        super().unmerge()
        if was_merged and self.is_dora:
            self.peft_layer._caches.pop(DORA_NORM_KEY, None)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        params = {
            f"lora_A.{PEFT_ADAPTER}.weight": self.peft_layer.lora_A[PEFT_ADAPTER].weight,
            f"lora_B.{PEFT_ADAPTER}.weight": self.peft_layer.lora_B[PEFT_ADAPTER].weight,
        }
        if self.is_dora:
            params[f"lora_magnitude_vector.{PEFT_ADAPTER}.weight"] = self.peft_layer.lora_magnitude_vector[
                PEFT_ADAPTER
            ].weight
        return params

    def size_label(self) -> str:
        # DoRA trains d_out magnitudes beside the rank-r factors.
        return f"r={self.peft_layer.r[PEFT_ADAPTER]}" + ("+m" if self.is_dora else "")

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.is_dora:
            return None  # W' - W is not B A: the adapter takes the SVD of ΔW
        layer = self.peft_layer
        B = layer.lora_B[PEFT_ADAPTER].weight.float() * layer.scaling[PEFT_ADAPTER]  # exported scaling is 1
        return B, layer.lora_A[PEFT_ADAPTER].weight.float()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """A and B drawn again as peft draws them (A random, B zero: ΔW = 0), from `generator` so that it is
        reproducible; DoRA's magnitude becomes the row norms of W again (which, after a fold, equal m)."""
        if self.init not in RESTARTABLE_INITS:
            raise RuntimeError(f"{self.label()}: init={self.init} cannot restart (the config check refuses it)")
        A = self.peft_layer.lora_A[PEFT_ADAPTER].weight
        if self.init == "gaussian":
            A.normal_(0.0, 1.0 / A.shape[0], generator=generator)  # peft's gaussian: std 1 / r
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.peft_layer.lora_B[PEFT_ADAPTER].weight)
        if self.is_dora:
            magnitude = self.peft_layer.lora_magnitude_vector[PEFT_ADAPTER].weight
            weight = dequantized_weight(self.frozen_linear()).to(magnitude.device)
            magnitude.copy_(torch.linalg.norm(weight, dim=1).to(magnitude.dtype))

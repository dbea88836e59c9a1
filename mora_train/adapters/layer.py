"""One adapted linear layer, as the model-level Adapter sees it: the layer protocol.

A method's layers (MoRA's MoRALinear, a wrapper around each of peft's LoRA layers, the linear layers full
fine-tuning trains) answer the same few questions: the frozen layer under the update, ΔW, the parameters the
method trains there, and, where they exist, exact LoRA factors. Merge, unmerge and fold (a restart) are
written once here from ΔW; a method overrides `apply_delta_` only where it has a faster exact way (MoRA adds
its rows in place without building ΔW). The model-level Adapter (adapters/base.py) and its capabilities
(adapters/capabilities.py) then write merge, ΔW, export and restarts once over a method's layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import nn

Sign = Literal["add", "sub"]


class AdapterLayer(ABC):
    """One linear layer with an update ΔW (d_out x d_in) beside its frozen weight W."""

    layer_name: str
    # True while W holds W + ΔW (the layer then computes with W alone).
    merged: bool = False

    @abstractmethod
    def frozen_linear(self) -> nn.Linear:
        """The linear layer under the update (on a quantized base, a bitsandbytes 4-/8-bit subclass of nn.Linear)."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """ΔW as a (d_out, d_in) float32 tensor (float64 when the layer's parameters are), on their device."""

    @abstractmethod
    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters the method trains on this layer, by their name inside it."""

    @abstractmethod
    def size_label(self) -> str:
        """The update's size for the run summary: `r=8` (LoRA), `r̂=96` (MoRA), `full`."""

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A), float32, with ΔW = B @ A exactly; None when the update has no such form of its own (the
        adapter then takes the SVD of ΔW)."""
        return None

    def label(self) -> str:
        return f"layer '{self.layer_name or '<unnamed layer>'}'"

    @torch.no_grad()
    def apply_delta_(self, sign: Sign) -> None:
        """W ± ΔW, in float32 (or ΔW's wider dtype) and cast back once; ValueError naming the layer when W is
        quantized (adding ΔW to 4-/8-bit codes would re-quantize it away: the adapter de-quantizes first) or
        the result is not finite (NaN/Inf in the adapter, or an overflow of W's dtype)."""
        weight = self.frozen_linear().weight
        if not weight.dtype.is_floating_point:
            raise ValueError(
                f"{self.label()}: its base weight is quantized ({weight.dtype}); merge through the adapter "
                "(merge_and_unload de-quantizes the base first), not into the codes"
            )
        delta = self.delta_weight().to(weight.device)
        wide = weight.to(torch.promote_types(delta.dtype, torch.float32))
        updated = (wide + delta) if sign == "add" else (wide - delta)
        result = updated.to(weight.dtype)
        if not torch.isfinite(result).all():
            raise ValueError(
                f"{self.label()}: the merged weight is not finite (NaN/Inf in the adapter, or beyond "
                f"{weight.dtype}); refusing to {'merge' if sign == 'add' else 'unmerge'}"
            )
        weight.copy_(result)

    def merge(self) -> None:
        """W += ΔW. A second call does nothing."""
        if self.merged:
            return
        self.apply_delta_("add")
        self.merged = True

    def unmerge(self) -> None:
        """W -= ΔW, restoring W up to float32 rounding. Does nothing when not merged."""
        if not self.merged:
            return
        self.apply_delta_("sub")
        self.merged = False


class RestartableLayer(AdapterLayer):
    """A layer whose update can start again from ΔW = 0 (ReMoRA / ReLoRA restarts)."""

    @abstractmethod
    def reset(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the adapter parameters as at the start of training (ΔW = 0 again)."""

    def fold(self, generator: torch.Generator | None = None) -> None:
        """W += ΔW (checked finite), then reset: the layer computes the same function and trains on from
        ΔW = 0. Not while merged (W then holds ΔW already)."""
        if self.merged:
            raise RuntimeError(f"{self.label()}: fold on a merged layer (unmerge first)")
        self.apply_delta_("add")
        self.reset(generator)

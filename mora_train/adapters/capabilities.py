"""What only some methods can do, as mix-ins beside Adapter, and how code outside this package asks for them.

A method lists the capabilities it has among its bases (`class MoraAdapter(Restartable, SwitchesOperators,
HasLoraFactors, Adapter)`); restarts and LoRA factors are written here once over the method's layers. Code
outside `mora_train.adapters` asks through the functions below, which hand back the capability or refuse by the
method's name: it never learns which method it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mora_train.adapters.base import Adapter, svd_factors
from mora_train.adapters.layer import RestartableLayer
from mora_train.core.errors import MoraTrainError


class Restartable(Adapter):
    """ReMoRA / ReLoRA restarts: fold ΔW into the frozen base weights, then start the adapter again from ΔW = 0.
    Written once over the method's layers, which must be RestartableLayers (they can re-initialise)."""

    @abstractmethod
    def adapter_layers(self) -> Mapping[str, RestartableLayer]: ...

    def adapted_base_weights(self) -> dict[str, torch.Tensor]:
        """Module name -> the frozen base weight under each adapted layer (what fold_and_reset() changes)."""
        return {name: layer.frozen_linear().weight for name, layer in self.adapter_layers().items()}

    def restart_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters, which fold_and_reset() re-initialises."""
        return [p for layer in self.adapter_layers().values() for p in layer.adapter_params().values()]

    def fold_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Add ΔW to the base weights (float32, checked finite) and re-initialise the adapter (ΔW = 0 again);
        `generator` draws any random start, so that a resumed run restarts identically."""
        for layer in self.adapter_layers().values():
            try:
                layer.fold(generator)
            except ValueError as err:
                raise MoraTrainError(f"{err} (at a restart)") from None


class SwitchesOperators(ABC):
    """Methods whose layers can change their operator pair while training (restarts cycle them)."""

    @abstractmethod
    def operator_types(self) -> dict[str, str]:
        """Module name -> operator pair."""

    @abstractmethod
    def set_operator(self, kind: str | int) -> None:
        """Switch every adapted layer to operator pair `kind`."""

    @abstractmethod
    def resolve_operator(self, kind: str | int) -> str:
        """The canonical name of operator pair `kind` (raises ValueError when unknown)."""


class HasLoraFactors(Adapter):
    """Methods whose update is a plain LoRA per layer, for serving engines (the PEFT LoRA export)."""

    @torch.no_grad()
    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> (B, A), float32, with ΔW = B @ A (scaling 1); exact to float32 rounding for every
        layer, its rank may differ per layer. A layer's own factors where it has them; otherwise the SVD of its
        ΔW cut at its numerical rank (singular values above float32's rounding floor relative to the largest)."""
        factors = {}
        for name, layer in self.adapter_layers().items():
            exact = layer.lora_factors()
            factors[name] = exact if exact is not None else svd_factors(layer.delta_weight().float())
        return factors


class TrainsFactorPair(Adapter):
    """Methods that train an update B A as two factors (LoRA and its family), whose learning rates LoRA+
    (`trainer.adapter_lr_ratio`) sets apart: B's is `ratio` times A's."""

    @abstractmethod
    def factor_pair_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer], optimizer_kwargs: dict[str, Any], ratio: float
    ) -> torch.optim.Optimizer:
        """The optimizer over trainable_parameters() with B's learning rate `ratio` x A's (`optimizer_kwargs`:
        transformers' for `optimizer_cls`, with lr and weight_decay)."""


def restartable(adapter: Adapter) -> Restartable:
    """`adapter` as a Restartable, or MoraTrainError naming the method (validation refuses such runs earlier)."""
    if isinstance(adapter, Restartable):
        return adapter
    raise MoraTrainError(f"adapter={adapter.name} has no adapter parameters to fold into the base weights and restart")


def operator_switching(adapter: Adapter) -> SwitchesOperators:
    """`adapter` as a SwitchesOperators, or MoraTrainError naming the method."""
    if isinstance(adapter, SwitchesOperators):
        return adapter
    raise MoraTrainError(f"adapter={adapter.name} has no operator pairs to switch")


def factor_pair(adapter: Adapter) -> TrainsFactorPair:
    """`adapter` as a TrainsFactorPair (LoRA+), or MoraTrainError naming the method (validation refuses it earlier)."""
    if isinstance(adapter, TrainsFactorPair):
        return adapter
    raise MoraTrainError(
        f"adapter={adapter.name} trains no pair of factors B A whose learning rates trainer.adapter_lr_ratio (LoRA+) "
        "could set apart; use adapter=lora or trainer.adapter_lr_ratio=null"
    )


def operator_types(adapter: Adapter) -> dict[str, str]:
    """Module name -> operator pair of a method that switches them; empty for the others."""
    return adapter.operator_types() if isinstance(adapter, SwitchesOperators) else {}


def lora_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter as exact LoRA factors, or MoraTrainError naming the method when it has no low-rank form."""
    if isinstance(adapter, HasLoraFactors):
        return adapter.lora_factors()
    raise MoraTrainError(
        f"adapter={adapter.name} has no low-rank form to export as LoRA; use the merged model (RUN_DIR/merged)"
    )

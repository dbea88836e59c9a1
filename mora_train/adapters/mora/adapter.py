"""MoRA on a whole model: put a MoRALinear around every target layer; save, load, merge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import (
    FORMAT,
    Adapter,
    find_target_linears,
    positive_rank,
    settings_as,
)
from mora_train.adapters.capabilities import HasLoraFactors, Restartable, SwitchesOperators
from mora_train.adapters.config import AdapterSettings, TrainerView
from mora_train.adapters.mora.config import MoraSettings, is_auto
from mora_train.adapters.mora.layer import (
    AUTO,
    AUTO_SHARING_FROM_RANK,
    MoRALinear,
    choose_mora_type,
    mora_shape_problem,
    mora_square_side,
    resolve_mora_type,
)
from mora_train.core.errors import ConfigError
from mora_train.models.quantization import set_submodule

FORMAT_VERSION = 1


def mora_layer_problems(model: nn.Module, target_modules: list[str], rank: int, mora_type: str | int) -> list[str]:
    """Every target layer this rank/type cannot serve, as one message each (empty when all fit)."""
    problems = []
    for name, linear in find_target_linears(model, target_modules).items():
        problem = mora_shape_problem(name, linear.in_features, linear.out_features, rank, mora_type)
        if problem:
            problems.append(problem)
    return problems


class MoraAdapter(Restartable, SwitchesOperators, HasLoraFactors, Adapter):
    settings_type = MoraSettings
    name = "mora"
    parallelism_refusal = (
        "MoRA's compression sums or rotates across a layer's whole input and its decompression tiles across "
        "its whole output, so a layer split across ranks cannot compute it"
    )

    @classmethod
    def config_problems(cls, settings: AdapterSettings, rank: int | None, trainer: TrainerView) -> list[str]:
        """The restart cycle (trainer.restart.mora_types) against adapter.mora_type."""
        mora_type = settings_as(MoraSettings, settings).mora_type
        cycle = trainer.restart.mora_types
        if cycle is None:
            return []
        if is_auto(mora_type):
            return [
                (
                    f"`adapter.mora_type=auto` with `trainer.restart.mora_types={cycle}`: the restart cycle names "
                    "the types itself; set adapter.mora_type to the cycle's first type"
                )
            ]
        if not cycle:
            return [
                f"`trainer.restart.mora_types={cycle!r}` must be a non-empty list such as [1, 2] or [sharing, grouping]"
            ]
        problems, resolved = [], []
        for value in cycle:
            try:
                resolved.append(resolve_mora_type(value))
            except ValueError as err:
                problems.append(f"`trainer.restart.mora_types`: {err}")
        try:
            chosen: str | None = choose_mora_type(mora_type, rank if isinstance(rank, int) else 0)
        except ValueError:  # an invalid rank or mora_type: reported by its own check, here the type stays unknown
            chosen = None
        restarts_on = trainer.restart.every_steps > 0
        if restarts_on and chosen and len(resolved) == len(cycle) and resolved[0] != chosen:
            # Said, not done silently: the layers start with the cycle's first pair.
            problems.append(
                f"`trainer.restart.mora_types={cycle}` starts with {resolved[0]}, but `adapter.mora_type={mora_type}`: "
                f"the restart cycle starts with adapter.mora_type; set adapter.mora_type={resolved[0]} or put "
                f"{chosen} first in trainer.restart.mora_types"
            )
        return problems

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        settings: AdapterSettings,
        rank: int | None,
        load_base: Callable[[], nn.Module] | None = None,
    ) -> MoraAdapter:
        mora = settings_as(MoraSettings, settings)
        return cls(model, positive_rank(rank), mora.mora_type, mora.target_names, mora.dropout)

    @classmethod
    def reads(cls, config: dict[str, Any]) -> bool:
        """mora-train's MoRA folders, and the official MoRA fork's (peft LoRA folders marked `use_mora`)."""
        return super().reads(config) or bool(config.get("use_mora"))

    @classmethod
    def load(cls, model: PreTrainedModel, folder: Path, config: dict[str, Any]) -> Adapter:
        if config.get("use_mora"):
            # Imported here: official.py builds a MoraAdapter, so importing it at the top would be a cycle.
            from mora_train.adapters.mora.official import load_official_mora

            return load_official_mora(model, folder, config)
        return super().load(model, folder, config)

    @classmethod
    def identity(cls, settings: AdapterSettings, rank: int | None) -> dict[str, Any]:
        return {"adapter": cls.name, "rank": rank}

    @classmethod
    def layer_problems(cls, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int) -> list[str]:
        mora_type = choose_mora_type(settings_as(MoraSettings, settings).mora_type, rank)
        # One message per layer kind and shape (a 30-layer model has 30 identical q_proj problems).
        failing: dict[tuple, list[str]] = {}
        for name, layer in layers.items():
            problem = mora_shape_problem(name, layer.in_features, layer.out_features, rank, mora_type)
            if problem:
                failing.setdefault((name.rsplit(".", 1)[-1], layer.in_features, layer.out_features), []).append(problem)
        problems = []
        for same_kind in failing.values():
            more = f" (and {len(same_kind) - 1} more layers like it)" if len(same_kind) > 1 else ""
            problems.append(f"`rank={rank}` with `adapter.mora_type={mora_type}`: {same_kind[0]}{more}")
        return problems

    @classmethod
    def trainable_count(
        cls, model: nn.Module, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int
    ) -> int:
        mora_type = choose_mora_type(settings_as(MoraSettings, settings).mora_type, rank)
        return sum(mora_square_side(m.in_features, m.out_features, rank, mora_type) ** 2 for m in layers.values())

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
        # mora_type=auto is decided here, once, from the rank; the chosen type is what is saved and reported.
        self.requested_type = mora_type
        self.rank, self.mora_type, self.dropout = rank, choose_mora_type(mora_type, rank), dropout
        self.target_modules = list(target_modules)
        if modules is None:
            problems = mora_layer_problems(model, self.target_modules, rank, self.mora_type)
            if problems:
                raise ConfigError(problems)
            model.requires_grad_(False)
            modules = {}
            for name, linear in find_target_linears(model, self.target_modules).items():
                layer = MoRALinear(linear, rank, self.mora_type, dropout=dropout, layer_name=name)
                set_submodule(model, name, layer)
                modules[name] = layer
        self.modules = modules

    def title(self) -> str:
        chosen = ", chosen by mora_type=auto" if is_auto(self.requested_type) else ""
        return f"mora (rank {self.rank}, type {self.mora_type}{chosen})"

    def identity_now(self) -> dict[str, Any]:
        return {"adapter": self.name, "rank": self.rank}

    def adapter_layers(self) -> dict[str, MoRALinear]:
        return self.modules

    def unload(self) -> PreTrainedModel:
        model = super().unload()
        self.modules = {}
        return model

    def operator_types(self) -> dict[str, str]:
        return {n: m.mora_type for n, m in self.modules.items()}

    def resolve_operator(self, kind: str | int) -> str:
        return resolve_mora_type(kind)

    def set_operator(self, kind: str | int) -> None:
        for layer in self.modules.values():
            try:
                layer.set_type(kind)
            except ValueError as err:
                raise ConfigError([f"{err} (set by `trainer.restart.mora_types`)"]) from None
        self.mora_type = resolve_mora_type(kind)  # the saved adapter config names the live operator type

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter": "mora",
            "rank": self.rank,
            "mora_type": self.mora_type,
            **(
                {
                    "mora_type_requested": AUTO,
                    "mora_type_rule": f"auto: rope below rank {AUTO_SHARING_FROM_RANK}, "
                    "sharing from it on (paper §5 runs; official README)",
                }
                if is_auto(self.requested_type)
                else {}
            ),
            "dropout": self.dropout,
            "target_modules": self.target_modules,
            "base_model": getattr(self.base_model.config, "_name_or_path", None),
            "modules": {
                n: {"in_features": m.in_features, "out_features": m.out_features, "r_hat": m.r_hat}
                for n, m in self.modules.items()
            },
        }

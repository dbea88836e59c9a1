"""Full fine-tuning behind the Adapter protocol: the trained weights are the model's own.

Every weight trains (`target_modules: all`) or only the named linear layers do. It saves and loads
the trained weights like an adapter (a checkpoint holds exactly them), merges by doing nothing (the
weights already are the model) and gives ΔW = W - W_base against the base model, which it reloads
on demand (`load_base`) instead of keeping a second copy of every weight in memory. It has no
adapter parameters of its own, so restarts and operator switches are refused at validation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import (
    ADAPTER_WEIGHTS_NAME,
    FORMAT,
    Adapter,
    ModuleSummary,
    copy_saved_weights,
    find_target_linears,
)
from mora_train.adapters.config import AdapterSettings, TrainerView
from mora_train.adapters.full.config import FullSettings
from mora_train.adapters.layer import AdapterLayer
from mora_train.core.errors import MoraTrainError


class TrainedLinear(AdapterLayer):
    """The layer protocol over a linear layer full fine-tuning trains: its weight already holds W_base + ΔW,
    so it is merged from the start and cannot unmerge; ΔW is that weight minus the base model's, which the
    adapter loads while it asks (`base_weights`)."""

    merged = True

    def __init__(self, name: str, linear: nn.Linear, base_weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.layer_name, self.linear, self.base_weights = name, linear, base_weights

    def frozen_linear(self) -> nn.Linear:
        return self.linear

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        original = self.base_weights().get(self.layer_name)
        weight = self.linear.weight
        if original is None or original.shape != weight.shape:
            raise MoraTrainError(f"the base model has no linear layer {self.layer_name} of shape {tuple(weight.shape)}")
        return weight.float() - original.to(weight.device).float()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return dict(self.linear.named_parameters())

    def size_label(self) -> str:
        return "full"

    def unmerge(self) -> None:
        raise MoraTrainError(f"{self.label()}: full fine-tuning keeps no separate update to take out of the weight")


class FullFineTune(Adapter):
    settings_type = FullSettings
    name = "full"
    freezes_base = False
    quantized_base_refusal = (
        "full fine-tuning updates the base weights themselves, and 4-/8-bit weights cannot take gradient steps "
        "(bitsandbytes stores them as integer codes); use adapter=lora or adapter=mora on the quantized base, "
        "or keep adapter=full with model.quantization=none"
    )

    @classmethod
    def config_problems(cls, settings: AdapterSettings, rank: int | None, trainer: TrainerView) -> list[str]:
        """Restarts and trainer.train_embeddings act on a frozen base beside an adapter, which this method has not."""
        problems = super().config_problems(settings, rank, trainer)
        if trainer.restart.every_steps > 0:
            problems.append(
                f"`trainer.restart.every_steps={trainer.restart.every_steps}` with adapter=full: full fine-tuning has "
                "no adapter to fold into the base weights and restart (its trained weights already are the model); "
                "use adapter=lora (ReLoRA) or adapter=mora (ReMoRA), or trainer.restart.every_steps=0"
            )
        if trainer.train_embeddings:
            problems.append(
                "`trainer.train_embeddings=true` with adapter=full: it trains the embeddings and the LM head beside "
                "an adapter's frozen base; full fine-tuning with adapter.target_modules=all trains them already. "
                "Drop trainer.train_embeddings, or use adapter=lora or adapter=mora"
            )
        return problems

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        settings: AdapterSettings,
        rank: int | None,
        load_base: Callable[[], nn.Module] | None = None,
    ) -> FullFineTune:
        return cls(model, settings.target_modules, load_base)  # rank means nothing here

    @classmethod
    def identity(cls, settings: AdapterSettings, rank: int | None) -> dict[str, Any]:
        return {"adapter": cls.name}  # rank means nothing here: a change of rank must not refuse a resume

    @classmethod
    def trainable_count(
        cls, model: nn.Module, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int
    ) -> int:
        if settings.target_modules == "all":
            return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        return sum(p.numel() for m in layers.values() for p in m.parameters())

    def __init__(
        self,
        model: PreTrainedModel,
        target_modules: list[str] | str = "all",
        load_base: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.base_model = model
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.load_base = load_base
        self._loaded_base: dict[str, torch.Tensor] | None = None
        if target_modules == "all":
            for param in model.parameters():
                param.requires_grad_(True)
            self._modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        else:
            model.requires_grad_(False)
            self._modules = find_target_linears(model, list(target_modules))
            for module in self._modules.values():
                module.requires_grad_(True)

    def title(self) -> str:
        return "full" if self.target_modules == "all" else f"full (layers {', '.join(self.target_modules)})"

    def identity_now(self) -> dict[str, Any]:
        return {"adapter": self.name}

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "adapter": self.name,
            "target_modules": self.target_modules,
            "base_model": getattr(self.base_model.config, "_name_or_path", None),
        }

    def adapter_layers(self) -> dict[str, TrainedLinear]:
        return {name: TrainedLinear(name, m, self._base_weights) for name, m in self._modules.items()}

    def _base_weights(self) -> dict[str, torch.Tensor]:
        if self._loaded_base is None:
            raise MoraTrainError(
                "ΔW of full fine-tuning is the trained weights minus the base model's, and this adapter was built "
                "without a way to load the base model (build_adapter(..., load_base=...))"
            )
        return self._loaded_base

    def module_summaries(self) -> list[ModuleSummary]:
        if self.target_modules == "all":
            return []  # every weight trains: the parameter count says it all
        return super().module_summaries()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.base_model.named_parameters() if p.requires_grad}

    @property
    def saves_whole_model(self) -> bool:
        return self.target_modules == "all"

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Every weight trained: a plain transformers model folder (save_pretrained; loads anywhere).
        Some layers trained: just their weights, as an adapter folder that load_adapter() puts on the base."""
        if self.saves_whole_model:
            live = self.trainable_parameters()
            source = None if state_dict is None else {k: state_dict[k] for k in live}
            self.base_model.save_pretrained(str(directory), state_dict=source)
            return
        super().save(directory, state_dict)

    def load_weights(self, directory: Path) -> None:
        directory = Path(directory)
        files = (
            [directory / ADAPTER_WEIGHTS_NAME]
            if (directory / ADAPTER_WEIGHTS_NAME).is_file()
            else sorted(
                directory.glob("model*.safetensors")  # save_pretrained's model.safetensors or its shards
            )
        )
        if not files:
            raise MoraTrainError(
                f"{directory} holds no fully fine-tuned weights (model*.safetensors or {ADAPTER_WEIGHTS_NAME})"
            )
        state = {k: v for f in files for k, v in load_file(str(f)).items()}
        copy_saved_weights(
            self.trainable_parameters(),
            state,
            str(directory),
            "fully fine-tuned weights",
            "wrong base model or target_modules?",
            "this model does not train it",
        )

    @torch.no_grad()
    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights minus the base model's, which is loaded for this call only (one more copy of
        the adapted weights in memory while it runs, none after)."""
        if self.load_base is not None:
            base = self.load_base().named_modules()
            self._loaded_base = {n: m.weight for n, m in base if isinstance(m, nn.Linear) and n in self._modules}
        try:
            return super().delta_weights()
        finally:
            self._loaded_base = None

    def unload(self) -> PreTrainedModel:
        return self.base_model  # the trained weights already are the model

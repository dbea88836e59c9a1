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
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    FORMAT,
    Adapter,
    ModuleSummary,
    copy_saved_weights,
    find_target_linears,
)
from mora_train.adapters.config import AdapterSettings, TrainerView
from mora_train.adapters.full.config import FullSettings
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically


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

    def module_summaries(self) -> list[ModuleSummary]:
        if self.target_modules == "all":
            return []  # every weight trains: the parameter count says it all
        return [
            ModuleSummary(name, m.in_features, m.out_features, "full", sum(p.numel() for p in m.parameters()))
            for name, m in self._modules.items()
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.base_model.named_parameters() if p.requires_grad}

    @property
    def saves_whole_model(self) -> bool:
        return self.target_modules == "all"

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Every weight trained: a plain transformers model folder (save_pretrained; loads anywhere).
        Some layers trained: just their weights, as an adapter folder that load_adapter() puts on the base."""
        directory = Path(directory)
        live = self.trainable_parameters()
        source = live if state_dict is None else {k: state_dict[k] for k in live}
        if self.saves_whole_model:
            self.base_model.save_pretrained(str(directory), state_dict=source if state_dict is not None else None)
            return
        tensors = {k: p.detach().contiguous().cpu() for k, p in source.items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt", "adapter": self.name})
        write_json_atomically(directory / ADAPTER_CONFIG_NAME, self.describe())

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
        if self.load_base is None:
            raise MoraTrainError(
                "ΔW of full fine-tuning is the trained weights minus the base model's, and this adapter was built "
                "without a way to load the base model (build_adapter(..., load_base=...))"
            )
        base = dict(self.load_base().named_modules())
        deltas = {}
        for name, module in self._modules.items():
            original = base.get(name)
            if not isinstance(original, nn.Linear) or original.weight.shape != module.weight.shape:
                raise MoraTrainError(f"the base model has no linear layer {name} of shape {tuple(module.weight.shape)}")
            deltas[name] = module.weight.float() - original.weight.to(module.weight.device).float()
        return deltas

    def merge_and_unload(self) -> PreTrainedModel:
        return self.base_model  # the trained weights already are the model

"""LoRA through peft, behind the same Adapter interface as MoRA."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import ADAPTER_WEIGHTS_NAME, Adapter, ModuleSummary, find_target_linears
from mora_train.core.errors import MoraTrainError

PEFT_ADAPTER = "default"


class LoraAdapter(Adapter):
    name = "lora"

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
                r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
            )
            peft_model = get_peft_model(model, config)
        self.peft_model = peft_model
        self.base_model = peft_model.get_base_model()
        self.target_modules = list(target_modules)

    @property
    def model(self) -> nn.Module:
        return self.peft_model

    def _lora_layers(self) -> dict[str, LoraLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, LoraLayer)}

    def module_summaries(self) -> list[ModuleSummary]:
        rows = []
        for name, layer in self._lora_layers().items():
            base = layer.get_base_layer()
            trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            rows.append(ModuleSummary(name, base.in_features, base.out_features, f"r={layer.r[PEFT_ADAPTER]}", trainable))
        return rows

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: m.get_delta_weight(PEFT_ADAPTER).float() for n, m in self._lora_layers().items()}

    def merge_and_unload(self) -> PreTrainedModel:
        # safe_merge checks the merged weights are finite before writing them.
        return self.peft_model.merge_and_unload(safe_merge=True)

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
        result = set_peft_model_state_dict(self.peft_model, state)
        if result.unexpected_keys:
            raise MoraTrainError(
                f"LoRA adapter in {directory} names modules this model lacks: {sorted(result.unexpected_keys)[:5]}"
            )

    def to_json(self) -> dict:
        return {"adapter": "lora", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout}

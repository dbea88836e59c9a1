"""Import adapters trained with the official MoRA fork of peft (GitHub kongds/MoRA).

Its folders are peft LoRA folders whose adapter_config.json adds `use_mora: true` and `mora_type`;
`r` is the LoRA rank (the fork derives r̂ from it as we do), and each layer's square matrix M is
stored as `...<layer>.lora_A.weight` (r̂ x r̂), with `lora_B` an alias of the same tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from mora_train.adapters.base import ADAPTER_WEIGHTS_NAME
from mora_train.adapters.mora.adapter import MoraAdapter
from mora_train.core.errors import MoraTrainError

PEFT_PREFIX = "base_model.model."


def official_state_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base_model.model.X.lora_A.weight` -> `X.mora_M`; lora_B (the alias) is checked, then dropped."""
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module = key.removeprefix(PEFT_PREFIX)
        if module.endswith((".lora_A.weight", ".lora_A.default.weight")):
            ours[module.split(".lora_A.")[0] + ".mora_M"] = tensor
    for key, tensor in state.items():
        if ".lora_B." in key:
            module = key.removeprefix(PEFT_PREFIX).split(".lora_B.")[0] + ".mora_M"
            if module in ours and not torch.equal(ours[module], tensor):
                raise MoraTrainError(f"official MoRA checkpoint: {key} differs from its lora_A alias")
    return ours


def load_official_mora(model: PreTrainedModel, adapter_dir: Path, config: dict) -> MoraAdapter:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise MoraTrainError(
            f"{adapter_dir}: target_modules given as a regex ({targets!r}) is not supported; list module names"
        )
    if targets is None:
        raise MoraTrainError(f"{adapter_dir}: adapter_config.json names no target_modules; list module names")
    adapter = MoraAdapter(
        model, int(config["r"]), config.get("mora_type", 1), list(targets), float(config.get("lora_dropout", 0.0))
    )
    adapter.load_state(
        official_state_to_ours(load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS_NAME))), str(adapter_dir)
    )
    return adapter

"""PiSSA and OLoRA: initialisations that move part of W into the adapter, and how their adapter is saved.

peft builds them by replacing each base weight W by a residual W_res = W - s B0 A0 (B0 A0 from the top singular
directions of W for PiSSA, from a QR of W for OLoRA), so that the model computes W x at the start. The trained
adapter (B, A) then only means something on W_res, which no freshly loaded base has. mora-train therefore saves
it, like peft's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`, as a plain LoRA on the
original weights: ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0], rank 2r, with alpha doubled (x sqrt 2 under
rsLoRA) so that the scaling stays s. Every folder written (adapter/ and each checkpoint) is such a LoRA: it loads
in plain peft on the original base, and a resume takes its first r rows back after checking the other r are
this run's own B0 A0 (the same base and initialisation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mora_train.adapters.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_file_atomically, write_json_atomically


def is_factor_key(key: str, factor: str) -> bool:
    """Whether a saved peft key (`base_model.model.<module>.lora_A.weight`) is a `factor` (lora_A, lora_B) entry."""
    return f".{factor}." in key


def converted_to_lora(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved (B, A) of a residual init -> the rank-2r LoRA [B | -B0], [A ; A0] on the original weights."""
    converted = {}
    for key, tensor in state.items():
        start = initial[key].to(device=tensor.device, dtype=tensor.dtype)
        if is_factor_key(key, "lora_A"):
            converted[key] = torch.cat([tensor, start], dim=0).contiguous()
        elif is_factor_key(key, "lora_B"):
            converted[key] = torch.cat([tensor, -start], dim=1).contiguous()
        else:  # the config check refuses DoRA's magnitude with these inits
            raise MoraTrainError(f"saved adapter entry {key} has no place in a LoRA on the original weights")
    return converted


def convert_saved_folder(directory: Path, initial: dict[str, torch.Tensor], use_rslora: bool) -> None:
    """Rewrite the peft folder just saved in `directory` as the LoRA on the original weights (see above)."""
    weights_path, config_path = Path(directory) / ADAPTER_WEIGHTS_NAME, Path(directory) / ADAPTER_CONFIG_NAME
    converted = converted_to_lora(load_file(str(weights_path)), initial)
    write_file_atomically(weights_path, lambda tmp: save_file(converted, str(tmp), metadata={"format": "pt"}))
    config = json.loads(config_path.read_text())
    config["r"] = 2 * int(config["r"])
    # peft's own conversion keeps the scaling: alpha / r under LoRA, alpha / sqrt(r) under rsLoRA.
    config["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if use_rslora else 2)
    config["init_lora_weights"] = True  # plain LoRA now: loading it must not decompose W again
    write_json_atomically(config_path, config)


def trained_part(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], rank: int, source: str
) -> dict[str, torch.Tensor]:
    """The run's own (B, A) from a folder convert_saved_folder wrote: the first `rank` rows of A and columns
    of B, once the others are checked to be this run's B0 A0 (MoraTrainError otherwise). B0 A0 is compared as a
    product: an SVD may flip the signs of singular vectors between machines, which changes neither W_res nor
    what (B, A) were trained on."""
    trained: dict[str, torch.Tensor] = {}
    saved_start: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key not in initial:
            continue  # named (and refused) by the caller's own check
        module, factor = key.rsplit(".lora_", 1)
        if factor.startswith("A"):
            trained[key], saved_start.setdefault(module, {})["A"] = tensor[:rank], tensor[rank:]
        else:
            trained[key], saved_start.setdefault(module, {})["B"] = tensor[:, :rank], -tensor[:, rank:]
    mismatched = [
        module
        for module, start in saved_start.items()
        if not _same_product(start, initial[f"{module}.lora_B.weight"], initial[f"{module}.lora_A.weight"])
    ]
    if mismatched:
        raise MoraTrainError(
            f"{source} was not written from this run's initialisation: its saved B0 A0 differ from the ones this "
            f"base gives ({', '.join(sorted(mismatched)[:3])}); resume with the same base model, rank and "
            "adapter.init, or start over with trainer.resume=false overwrite=true"
        )
    return {key: tensor.contiguous() for key, tensor in trained.items()}


def _same_product(saved: dict[str, torch.Tensor], B0: torch.Tensor, A0: torch.Tensor) -> bool:
    """Whether the saved B0 A0 equals this run's to float32 rounding (an SVD computed again may round apart)."""
    if set(saved) != {"A", "B"} or saved["B"].shape != B0.shape or saved["A"].shape != A0.shape:
        return False
    ours = B0.double() @ A0.double()
    theirs = saved["B"].double().to(ours.device) @ saved["A"].double().to(ours.device)
    return float((ours - theirs).abs().max()) <= 1e-4 * float(ours.abs().max()) + 1e-6

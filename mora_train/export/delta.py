"""ΔW of a run, layer by layer: from its saved adapter re-attached to the base model, or as the merged model minus
the base model. The spectrum (analysis.spectrum) counts its singular values; the LoRA export (export.lora) writes
it as LoRA factors when the live adapter does not hold the whole update (a run with restarts)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mora_train.adapters.base import match_target_linears, svd_factors
from mora_train.core.errors import MoraTrainError
from mora_train.core.run_dir import RunDir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The number in a layer name's `.layers.N.`: the linear layers inside the transformer blocks (not the LM head).
BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def adapter_deltas(base_model: PreTrainedModel, adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted layer of a saved LoRA/MoRA adapter, attached to `base_model` (which it modifies)."""
    from mora_train.adapters import load_adapter

    try:
        adapter = load_adapter(base_model, adapter_dir)
    except MoraTrainError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt adapter files, or an adapter of another base model
        raise MoraTrainError(
            f"could not attach the adapter in {adapter_dir} to its base model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); its files are corrupt or it belongs to "
            "another base model (pass that one with --base-model)"
        ) from None
    return adapter.delta_weights()


def load_merged(merged_dir: Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """A merged checkpoint (RUN_DIR/merged or any model folder) in float32, to subtract its base model from."""
    from transformers import AutoModelForCausalLM

    from mora_train.models import load_error

    try:
        merged = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 - the loading boundary: corrupt weights, not a model, ...
        raise load_error("model", str(merged_dir), err, "path") from None
    return merged.eval()


def merged_deltas(
    base_model: nn.Module, merged_model: nn.Module, layers: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """W_merged - W_base for each layer named in `layers`, changed or not; without `layers`, for every linear
    layer inside the transformer blocks whose weights changed (a LoRA run that targets only some layers)."""
    base_linears = {n: m for n, m in base_model.named_modules() if isinstance(m, nn.Linear)}
    merged_linears = {n: m for n, m in merged_model.named_modules() if isinstance(m, nn.Linear)}
    names = list(layers) if layers is not None else [n for n in merged_linears if BLOCK_INDEX.search(f".{n}.")]
    deltas = {}
    with torch.no_grad():
        for name in names:
            base, merged = base_linears.get(name), merged_linears.get(name)
            if base is None or merged is None or base.weight.shape != merged.weight.shape:
                raise MoraTrainError(
                    f"merged model layer {name} has no counterpart of the same shape in the base model; "
                    "is --base-model the model this run started from?"
                )
            delta = merged.weight.float() - base.weight.float()
            if layers is not None or delta.abs().max().item() > 0:
                deltas[name] = delta
    if not deltas and layers is None:
        raise MoraTrainError("the merged model equals the base model in every block layer: nothing was trained")
    return deltas


def merged_update_factors(
    run_dir: Path, base: nn.Module, targets: list[str], trust_remote_code: bool = False
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], nn.Module]:
    """RUN_DIR/merged − base for every layer `targets` adapts, as SVD factors (B, A) exact to rounding at the
    numerical rank; and the merged model they reproduce."""
    merged = load_merged(RunDir(run_dir).merged, trust_remote_code)
    layers, unmatched = match_target_linears(base, targets)
    if unmatched:
        raise MoraTrainError(f"{run_dir}: its adapter's target_modules {unmatched} match no layer of the base model")
    return {name: svd_factors(delta) for name, delta in merged_deltas(base, merged, layers).items()}, merged

"""Merge the adapter into the base weights, save a plain transformers checkpoint, and prove it loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from mora_train.adapters.base import Adapter
from mora_train.data.common import PadCollator
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically
from mora_train.models.quantization import compute_dtype, is_quantized

log = logging.getLogger(__name__)

# The merge check's tolerance (max |logit difference| between the adapted model and its reloaded merged
# checkpoint) is never below these absolute floors...
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# ...and otherwise follows the rounding floor of the model at hand: FLOOR_FACTOR times how far the adapted
# model's own logits move when its forward runs in its storage dtype instead of float64 (`rounding_floor`).
# Why: a correct merge differs from the exact adapted model only by rounding W + ΔW to the storage dtype, a
# perturbation of one ulp per weight — the same size as what one low-precision forward does to every weight
# and activation, so it cannot exceed that measured floor by much (SmolLM2 with MoRA sharing at r=256 and a
# large M: merge error ~4e-4, fp32-vs-fp64 forward ~1e-4; the factor leaves headroom for that ratio). A wrong
# merge (a ΔW off by a fraction of itself on one layer) moves the logits by that fraction of the layer's
# contribution, orders of magnitude above rounding (tests/unit/test_merge_check.py checks both sides).
FLOOR_FACTOR = 10.0
# Models up to this size are compared in float64 on CPU: the check then measures the merge (W + ΔW
# rounded to the checkpoint's dtype), not the order in which 30 layers of fp32 arithmetic round
# (SmolLM2-135M's fp32 logits differ by ~1e-4 between W x + ΔW x and (W + ΔW) x for that reason alone).
FLOAT64_CHECK_MAX_PARAMS = 2_000_000_000


@dataclass
class ExportResult:
    merged_dir: Path
    max_abs_diff: float
    model: PreTrainedModel  # the merged model as reloaded from disk
    tolerance: float = 0.0  # the merge check's tolerance for this model (see FLOOR_FACTOR)
    passed: bool = True  # whether the reloaded checkpoint reproduced the adapted logits within it
    # Quantized base: max |logit difference| between the quantized kernels' forward and the same adapted model
    # on their de-quantized weights (0 for 4-bit on CPU; LLM.int8 quantizes activations too). None: float base.
    quantized_kernel_diff: float | None = None

    def failure_message(self, adapter_dir: Path | None) -> str:
        keep = (f"The adapter in {adapter_dir} is intact: re-attach it with mora_train.load_adapter(base_model, "
                f"'{adapter_dir}')" if adapter_dir else "The trained weights are in the run's last checkpoint")
        return (
            f"the merged checkpoint does not reproduce the trained model: max |logit difference| "
            f"{self.max_abs_diff:.3g} > tolerance {self.tolerance:.3g} (the model's float rounding floor x "
            f"{FLOOR_FACTOR:g}). It was kept as {self.merged_dir} for inspection and not evaluated; metrics.json "
            f"records merge_max_abs_diff, merge_tolerance and run.merge_check. {keep}. Please report this with "
            "the run's resolved_config.yaml"
        )


def probe_batch(examples: list[dict], pad_token_id: int, size: int = 4) -> dict[str, torch.Tensor]:
    """A fixed small batch (the first training examples) to compare logits on."""
    # Only ids and labels: packed examples' position ids would switch the collator to its mask-free layout.
    batch = PadCollator(pad_token_id)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[:size]])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of the real (unpadded) tokens; with `dtype`, computed in that dtype and the model restored after."""
    model.eval()
    first = next(model.parameters())
    original = first.dtype
    if dtype is not None and dtype != original:
        model.to(dtype)  # fp32 -> fp64 -> fp32 is exact, so the model comes back unchanged
    try:
        out = model(**{k: v.to(first.device) for k, v in batch.items()})
    finally:
        if dtype is not None and dtype != original:
            model.to(original)
    mask = batch["attention_mask"].to(first.device).bool()
    return out.logits.to(torch.float64)[mask]


def check_dtype(model: torch.nn.Module) -> torch.dtype | None:
    first = next(model.parameters())
    small = sum(p.numel() for p in model.parameters()) <= FLOAT64_CHECK_MAX_PARAMS
    return torch.float64 if first.dtype == torch.float32 and first.device.type == "cpu" and small else None


def rounding_floor(model: torch.nn.Module, batch: dict[str, torch.Tensor], reference: torch.Tensor) -> float:
    """Max |logit change| between the model's forward in its own dtype and the float64 `reference`:
    the rounding noise of this model with these weights on this batch (0.0 when no float64 reference)."""
    own = logits_of(model, batch)
    return float((own - reference).abs().max().item()) if own.shape == reference.shape else 0.0


def merge_tolerance(dtype: torch.dtype, floor: float, logits: torch.Tensor) -> float:
    """The merge check's tolerance: FLOOR_FACTOR x the measured rounding floor, at least the dtype's absolute
    floor. Without a float64 reference (GPU or huge models) the floor is estimated from the logits' magnitude
    (one ulp of the largest logit per layer of depth, a generous stand-in)."""
    if floor <= 0.0 and logits.numel():
        floor = torch.finfo(dtype).eps * float(logits.abs().max().item()) * 32 if dtype.is_floating_point else 0.0
    return max(MERGE_TOLERANCE.get(dtype, 1e-4), FLOOR_FACTOR * floor)


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """save_pretrained (safetensors) + tokenizer + generation config, written to a temp dir then renamed."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))

    write_dir_atomically(target, write)


def export_merged(
    adapter: Adapter,
    tokenizer: PreTrainedTokenizerBase,
    probe: dict[str, torch.Tensor],
    target: Path,
    dtype: torch.dtype | None = None,
) -> ExportResult:
    """Merge, save to `target` in `dtype` (default: the dtype the model computed in — on a quantized base its
    compute dtype, never the 4-/8-bit codes), reload it with plain transformers and compare logits with the
    adapted model.

    The result says whether the reloaded checkpoint reproduces the adapted logits within the model's
    tolerance (`merge_tolerance`); on a failure the caller keeps the adapter, records the outcome and stops.
    """
    trained_dtype = compute_dtype(adapter.model)
    kernel_diff = None
    if is_quantized(adapter.model):
        # The merge goes into the de-quantized weights (adapter.dequantize_base); what the quantized kernels
        # computed differently from those weights is measured here and recorded, not hidden in the tolerance.
        quantized_logits = logits_of(adapter.model, probe)
        adapter.dequantize_base()
        kernel_diff = float((logits_of(adapter.model, probe) - quantized_logits).abs().max().item())
    compare_dtype = check_dtype(adapter.model)
    adapted_logits = logits_of(adapter.model, probe, compare_dtype)
    floor = rounding_floor(adapter.model, probe, adapted_logits) if compare_dtype is not None else 0.0
    merged = adapter.merge_and_unload()
    dtype = dtype or trained_dtype
    merged.to(dtype)
    # Writing in a coarser dtype than the model computed in rounds every weight: the check can then only be
    # as strict as that dtype's (estimated) rounding, not the measured floor of the trained dtype.
    if torch.finfo(dtype).eps > torch.finfo(trained_dtype).eps:
        tolerance = merge_tolerance(dtype, 0.0, adapted_logits)
    else:
        tolerance = merge_tolerance(trained_dtype, floor, adapted_logits)
    save_merged(merged, tokenizer, target)
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise MoraTrainError(
            f"the merged checkpoint just written to {target} cannot be read back ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); check the disk, then rerun"
        ) from None
    reloaded.to(next(merged.parameters()).device)
    diff = (logits_of(reloaded, probe, compare_dtype) - adapted_logits).abs().max().item()
    passed = bool(diff <= tolerance)
    log.info(
        "merged checkpoint %s %s the adapted logits: max |difference| %.3g, tolerance %.3g (rounding floor %.3g x %g)",
        target, "reproduces" if passed else "does NOT reproduce", diff, tolerance, floor, FLOOR_FACTOR,
    )
    return ExportResult(merged_dir=target, max_abs_diff=diff, model=reloaded, tolerance=tolerance, passed=passed,
                        quantized_kernel_diff=kernel_diff)

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

log = logging.getLogger(__name__)

# Max |logit difference| accepted between the adapted model and its reloaded merged checkpoint.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Models up to this size are compared in float64 on CPU: the check then measures the merge (W + ΔW
# rounded to the checkpoint's dtype), not the order in which 30 layers of fp32 arithmetic round
# (SmolLM2-135M's fp32 logits differ by ~1e-4 between W x + ΔW x and (W + ΔW) x for that reason alone).
FLOAT64_CHECK_MAX_PARAMS = 2_000_000_000


@dataclass
class ExportResult:
    merged_dir: Path
    max_abs_diff: float
    model: PreTrainedModel  # the merged model as reloaded from disk


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


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """save_pretrained (safetensors) + tokenizer + generation config, written to a temp dir then renamed."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))

    write_dir_atomically(target, write)


def export_merged(
    adapter: Adapter, tokenizer: PreTrainedTokenizerBase, probe: dict[str, torch.Tensor], target: Path
) -> ExportResult:
    """Merge, save to `target`, reload it with plain transformers and compare logits with the adapted model.

    Raises MoraTrainError when the reloaded checkpoint disagrees by more than the dtype's tolerance.
    """
    compare_dtype = check_dtype(adapter.model)
    adapted_logits = logits_of(adapter.model, probe, compare_dtype)
    merged = adapter.merge_and_unload()
    dtype = next(merged.parameters()).dtype
    save_merged(merged, tokenizer, target)
    reloaded = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    reloaded.to(next(merged.parameters()).device)
    diff = (logits_of(reloaded, probe, compare_dtype) - adapted_logits).abs().max().item()
    tolerance = MERGE_TOLERANCE.get(dtype, 1e-4)
    log.info("merged checkpoint %s reproduces the adapted logits to %.3g (tolerance %.0e)", target, diff, tolerance)
    if not diff <= tolerance:
        raise MoraTrainError(
            f"the merged checkpoint in {target} does not reproduce the trained model: max |logit difference| "
            f"{diff:.3g} > {tolerance:.0e}. The adapter in the run dir is intact; please report this with the run's config."
        )
    return ExportResult(merged_dir=target, max_abs_diff=diff, model=reloaded)

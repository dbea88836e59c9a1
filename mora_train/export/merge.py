"""Merge the adapter into the base weights, save a plain transformers checkpoint, and prove it loads: the
reloaded checkpoint must compute the adapted model's logits (the tolerances are in export.checks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from mora_train.adapters.base import Adapter
from mora_train.config.schema import Section, setting
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically
from mora_train.export.checks import (
    FLOOR_FACTOR,
    BeforeCastCheck,
    KernelCheck,
    check_dtype,
    check_quantized_kernels,
    coarsest_float_dtype,
    dtype_name,
    export_rounding_floor,
    merge_tolerance,
    rounding_floor,
)
from mora_train.export.probe import logits_of
from mora_train.models.quantization import compute_dtype, is_quantized

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportConfig(Section):
    """The merged checkpoint (RUN_DIR/merged)."""

    dtype: Literal["fp32", "bf16", "fp16"] | None = setting(
        default=None, help="the merged checkpoint's dtype; null: the dtype the model computed in (never 4-/8-bit codes)"
    )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return EXPORT_DTYPES[self.dtype] if self.dtype is not None else None


@dataclass
class ExportResult:
    merged_dir: Path
    max_abs_diff: float
    model: PreTrainedModel  # the merged model as reloaded from disk
    tolerance: float = 0.0  # the merge check's tolerance for this model (see FLOOR_FACTOR)
    kernel: KernelCheck | None = None  # quantized base only
    before_cast: BeforeCastCheck | None = None  # checkpoint coarser than the trained dtype only

    @property
    def merge_passed(self) -> bool:
        """Whether the reloaded checkpoint reproduced the adapted logits within its tolerance and, when it was
        cast to a coarser dtype, the merged model did within the trained dtype's before that cast."""
        return self.max_abs_diff <= self.tolerance and (self.before_cast is None or self.before_cast.passed)

    @property
    def passed(self) -> bool:
        """Whether merged/ is the trained model: the merge reproduced and, on a quantized base, the de-quantized
        weights reproduce the quantized kernels' reference."""
        return self.merge_passed and (self.kernel is None or self.kernel.passed)

    @property
    def quantized_kernel_diff(self) -> float | None:
        return self.kernel.max_abs_diff if self.kernel is not None else None

    @property
    def quantized_kernel_tolerance(self) -> float | None:
        return self.kernel.tolerance if self.kernel is not None else None

    def failure_message(self, adapter_dir: Path | None) -> str:
        keep = (
            f"The adapter in {adapter_dir} is intact: re-attach it with mora_train.load_adapter(base_model, "
            f"'{adapter_dir}')"
            if adapter_dir
            else "The trained weights are in the run's last checkpoint"
        )
        problems = []
        if self.before_cast is not None and not self.before_cast.passed:
            problems.append(
                f"before its cast to {dtype_name(self.before_cast.dtype)} the merged model's max |logit difference| "
                f"{self.before_cast.max_abs_diff:.3g} > tolerance {self.before_cast.tolerance:.3g} (the model's float "
                f"rounding floor x {FLOOR_FACTOR:g})"
            )
        if not self.max_abs_diff <= self.tolerance:
            floor = (
                "the model's float rounding floor"
                if self.before_cast is None
                else (f"the rounding floor of {dtype_name(self.before_cast.dtype)} weights")
            )
            problems.append(
                f"max |logit difference| {self.max_abs_diff:.3g} > tolerance {self.tolerance:.3g} ({floor} "
                f"x {FLOOR_FACTOR:g})"
            )
        if self.kernel is not None and not self.kernel.passed:
            problems.append(
                f"its de-quantized weights do not compute what the quantized kernels compute: max |logit difference| "
                f"{self.kernel.max_abs_diff:.3g} from {self.kernel.reference} > tolerance {self.kernel.tolerance:.3g} "
                "(the kernels' own rounding; a larger gap means the de-quantization misread the 4-/8-bit weights)"
            )
        return (
            f"the merged checkpoint does not reproduce the trained model: {'; and '.join(problems)}. It was kept as "
            f"{self.merged_dir} for inspection and not evaluated; metrics.json records merge_max_abs_diff, "
            "merge_tolerance, merge_before_cast_max_abs_diff, merge_before_cast_tolerance, "
            "quantized_kernel_max_abs_diff, quantized_kernel_tolerance and run.merge_check. "
            f"{keep}. Please report this with the run's resolved_config.yaml and `pip show bitsandbytes`"
        )


def as_module(model: PreTrainedModel) -> torch.nn.Module:
    """`model` itself, typed as the nn.Module it is, for `.to(...)`: transformers wraps PreTrainedModel.to with
    functools.wraps(nn.Module.to), and typeshed's type of such a wrapper does not bind `self` (mypy then reads
    the dtype as the model argument). The call still runs transformers' .to."""
    return model


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
    quantized_reference: torch.Tensor | None = None,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Merge, save to `target` in `dtype` (default: the dtype the model computed in — on a quantized base its
    compute dtype, never the 4-/8-bit codes), reload it with plain transformers and compare logits with the
    adapted model.

    On a quantized base the de-quantized weights are first checked against `quantized_reference` (logits of
    an independent rebuild of the trained model, `quantized_reference_logits`; default: the live model's
    quantized forward). The result says whether both checks passed; on a failure the caller keeps the
    adapter, records the outcome and stops. `trust_remote_code`: model.trust_remote_code, for the reload.
    """
    trained_dtype = compute_dtype(adapter.model)
    kernel = check_quantized_kernels(adapter, probe, quantized_reference) if is_quantized(adapter.model) else None
    compare_dtype = check_dtype(adapter.model)
    adapted_logits = logits_of(adapter.model, probe, compare_dtype)
    floor = rounding_floor(adapter.model, probe, adapted_logits) if compare_dtype is not None else 0.0
    dtype = dtype or trained_dtype
    # On a quantized base peft's k-bit preparation keeps norms, embeddings and the LM head in float32, so a
    # checkpoint in a 16-bit compute dtype is coarser than part of what the model computed in.
    finest = torch.float32 if kernel is not None else trained_dtype
    coarser = torch.finfo(dtype).eps > torch.finfo(finest).eps
    cast_floor = export_rounding_floor(adapter.model, probe, adapted_logits, dtype, compare_dtype) if coarser else 0.0
    merged = adapter.merge_and_unload()
    tolerance = merge_tolerance(trained_dtype, floor, adapted_logits)
    before_cast = None
    if coarser:
        before_cast = check_before_cast(merged, probe, adapted_logits, compare_dtype, floor, dtype)
        # The reloaded checkpoint adds the cast's rounding to whatever the merge left (at most the above).
        tolerance = max(before_cast.tolerance, merge_tolerance(dtype, cast_floor, adapted_logits))
    reloaded = save_and_reload(merged, tokenizer, target, dtype, trust_remote_code)
    diff = (logits_of(reloaded, probe, compare_dtype) - adapted_logits).abs().max().item()
    result = ExportResult(
        merged_dir=target,
        max_abs_diff=diff,
        model=reloaded,
        tolerance=tolerance,
        kernel=kernel,
        before_cast=before_cast,
    )
    _log_checks(result, floor, cast_floor if coarser else floor)
    return result


def check_before_cast(
    merged: PreTrainedModel,
    probe: dict[str, torch.Tensor],
    adapted_logits: torch.Tensor,
    compare_dtype: torch.dtype | None,
    floor: float,
    dtype: torch.dtype,
) -> BeforeCastCheck:
    """The merged model, not yet cast to the checkpoint's coarser `dtype`, against the adapted logits."""
    diff = float((logits_of(merged, probe, compare_dtype) - adapted_logits).abs().max().item())
    # Held in float32 (a 16-bit compute dtype's de-quantized base, cast up for the float64 reference), the
    # merged weights are checked as a float32 checkpoint; held in the 16-bit dtype, as one in that dtype.
    held = merge_tolerance(coarsest_float_dtype(merged), floor, adapted_logits)
    return BeforeCastCheck(max_abs_diff=diff, tolerance=held, dtype=dtype)


def save_and_reload(
    merged: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> PreTrainedModel:
    """`merged` cast to `dtype` and saved to `target`, then read back by plain transformers onto its device."""
    as_module(merged).to(dtype)
    save_merged(merged, tokenizer, target)
    reloaded = reload_merged(target, dtype, trust_remote_code)
    as_module(reloaded).to(next(merged.parameters()).device)
    return reloaded


def _log_checks(result: ExportResult, floor: float, reloaded_floor: float) -> None:
    """The merge check's outcome: before the cast (a coarser checkpoint only), then the reloaded checkpoint."""
    if result.before_cast is not None:
        log.info(
            "merged model before its cast to %s: max |logit difference| %.3g, tolerance %.3g (rounding floor %.3g x "
            "%g)",
            dtype_name(result.before_cast.dtype),
            result.before_cast.max_abs_diff,
            result.before_cast.tolerance,
            floor,
            FLOOR_FACTOR,
        )
    log.info(
        "merged checkpoint %s %s the adapted logits: max |difference| %.3g, tolerance %.3g (rounding floor %.3g x %g)",
        result.merged_dir,
        "reproduces" if result.merge_passed else "does NOT reproduce",
        result.max_abs_diff,
        result.tolerance,
        reloaded_floor,
        FLOOR_FACTOR,
    )


def reload_merged(target: Path, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The checkpoint just written to `target`, loaded by plain transformers in `dtype`."""
    try:
        # trust_remote_code is always given (never None): transformers would otherwise ask on stdin.
        return AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError, RuntimeError) as err:
        raise MoraTrainError(
            f"the merged checkpoint just written to {target} cannot be read back ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); check the disk, then rerun"
        ) from None

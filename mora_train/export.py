"""Merge the adapter into the base weights, save a plain transformers checkpoint, and prove it loads."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from mora_train.adapters.base import Adapter
from mora_train.config.schema import Section, section, setting
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically
from mora_train.data.common import PadCollator
from mora_train.models.quantization import (
    compute_dtype,
    is_quantized,
    keep_training_layout,
    kernel_relative_tolerance,
    training_kernels,
)

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@section
class ExportConfig(Section):
    """The merged checkpoint (RUN_DIR/merged)."""

    dtype: Literal["fp32", "bf16", "fp16"] | None = setting(
        default=None, help="the merged checkpoint's dtype; null: the dtype the model computed in (never 4-/8-bit codes)"
    )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return EXPORT_DTYPES[self.dtype] if self.dtype is not None else None


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
# A checkpoint written in a coarser dtype than the model computed in (export.dtype=bf16 of a float32 model;
# a quantized base with 16-bit compute, whose norms and embeddings peft keeps in float32) is checked twice.
# First the merged model before its cast, with the tolerance above for the dtype its weights are held in.
# Why: the cast rounds every weight, which hides a wrong ΔW (tiny Llama, MoRA sharing with ΔW ~ W, bf16:
# the cast of a correct merge moves the logits by 0.02, with a measured floor of 0.036; a ΔW wrong by 1 %
# on one layer moves them by 0.006, by 10 % by 0.057), so a tolerance that follows the cast's floor cannot
# fail those. Then the reloaded checkpoint, with FLOOR_FACTOR x the cast's own floor measured on the adapted
# model (`export_rounding_floor`: every weight moved by one random rounding error of the checkpoint's
# dtype, the errors drawn with this seed), which fails a cast, save or reload that lost more than rounding.
ROUNDING_NOISE_SEED = 0


@dataclass
class KernelCheck:
    """A quantized base: the adapted model on its de-quantized weights against an independent reference of
    the trained model computed with the quantized kernels (`quantized_reference_logits`, or the live model's
    own forward taken before de-quantization). A wrong de-quantization (a misread layout, wrong scales) moves
    the logits by the size of the weights; a correct one only by the kernels' rounding (`kernel_tolerance`)."""

    max_abs_diff: float
    tolerance: float
    reference: str  # what the reference logits came from, in words

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class BeforeCastCheck:
    """A checkpoint in a coarser dtype than the model computed in: the merged model before its cast to
    `dtype`, against the adapted model, with the tolerance a checkpoint in the dtype its weights are held in
    would get. A wrong ΔW fails here even where it moves the logits less than rounding every weight to `dtype`
    does."""

    max_abs_diff: float
    tolerance: float
    dtype: torch.dtype  # the checkpoint's dtype, which the merged model was cast to after this check

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


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
                f"before its cast to {_dtype_name(self.before_cast.dtype)} the merged model's max |logit difference| "
                f"{self.before_cast.max_abs_diff:.3g} > tolerance {self.before_cast.tolerance:.3g} (the model's float "
                f"rounding floor x {FLOOR_FACTOR:g})"
            )
        if not self.max_abs_diff <= self.tolerance:
            floor = (
                "the model's float rounding floor"
                if self.before_cast is None
                else (f"the rounding floor of {_dtype_name(self.before_cast.dtype)} weights")
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


def probe_batch(examples: list[dict], pad_token_id: int, size: int = 4) -> dict[str, torch.Tensor]:
    """A fixed small batch (the first training examples) to compare logits on."""
    # Only ids and labels: packed examples' position ids would switch the collator to its mask-free layout.
    batch = PadCollator(pad_token_id)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[:size]])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of the real (unpadded) tokens; with `dtype`, computed in that dtype and the model restored after."""
    model.eval()
    return _forward_logits(model, batch, dtype)


@torch.no_grad()
def quantized_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the real tokens as training computed them: eval mode, but the quantized layers' training kernels
    (models.quantization.training_kernels: on CPU, int8 evaluates with int8 activations but trained without)."""
    model.eval()
    with training_kernels(model):
        return _forward_logits(model, batch)


def _forward_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> torch.Tensor:
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rounding_errors(weight: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random errors of the size rounding `weight` to `dtype` makes: uniform in +-half of `dtype`'s spacing
    at each value (its unit in the last place; the fixed subnormal spacing near zero), 0 for zeros."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(weight)
    spacing = torch.ldexp(torch.full_like(weight, info.eps / 2), exponent).clamp(min=info.smallest_normal * info.eps)
    uniform = torch.rand(weight.shape, generator=generator, dtype=weight.dtype, device=weight.device) - 0.5
    return torch.where(weight == 0, 0.0, spacing * uniform)


@contextlib.contextmanager
def weights_rounding_noise(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, each forward of `model` computes with every float parameter finer than `dtype` moved
    by one random rounding error of `dtype` (`rounding_errors`; the same errors at every call).

    Not the rounding itself: a weight that already lies on `dtype`'s grid (a float32 model loaded from a
    bfloat16 checkpoint, a base de-quantized into a 16-bit compute dtype) would not move, though the merge
    moves it off that grid (W + ΔW) and the cast rounds it again. One module at a time: its parameters are
    swapped for moved copies during its own forward and the originals put back right after, so the model
    comes back bit for bit and never exists twice (a 7B model on a GPU could not)."""
    moved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # id(param) -> (param, its original data)

    def hooks_for(index: int, module: torch.nn.Module) -> list:
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]

        def move(_module: torch.nn.Module, _args: object) -> None:
            generator = torch.Generator(device=own[0].device)
            generator.manual_seed(ROUNDING_NOISE_SEED + index)
            for param in own:
                # A weight held in `dtype` or coarser is not rounded by the cast (the merge rounded W + ΔW into
                # it, which the check before the cast covers); a weight shared with a module whose forward is
                # still running is already moved.
                if torch.finfo(param.dtype).eps < torch.finfo(dtype).eps and id(param) not in moved:
                    moved[id(param)] = (param, param.data)
                    param.data = param.data + rounding_errors(param.data, dtype, generator)

        def restore(_module: torch.nn.Module, _args: object, _output: object) -> None:
            for param in own:
                if id(param) in moved:
                    param.data = moved.pop(id(param))[1]

        return [module.register_forward_pre_hook(move), module.register_forward_hook(restore)]

    hooks = [
        hook
        for index, module in enumerate(model.modules())
        if any(p.is_floating_point() for p in module.parameters(recurse=False))
        for hook in hooks_for(index, module)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        # A forward that raised skipped its restore hooks, and logits_of has since cast the model back from
        # its float64 copy: the originals, exact in that dtype, are put back in it.
        for param, original in moved.values():
            param.data = original.to(param.dtype)


def coarsest_float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The float dtype of the model's parameters with the widest spacing (float32 if it has none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} or {torch.float32}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def export_rounding_floor(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    reference: torch.Tensor,
    dtype: torch.dtype,
    compare_dtype: torch.dtype | None,
) -> float:
    """Max |logit change| when every float weight of the adapted model moves by one rounding error of the
    checkpoint's `dtype`, against `reference` (its logits in `compare_dtype`, float64 where possible): the
    floor of a correct merge written in `dtype`, which rounds each W + ΔW and every other weight once."""
    with weights_rounding_noise(model, dtype):
        moved = logits_of(model, batch, compare_dtype)
    return float((moved - reference).abs().max().item()) if moved.numel() else 0.0


def merge_tolerance(dtype: torch.dtype, floor: float, logits: torch.Tensor) -> float:
    """The merge check's tolerance: FLOOR_FACTOR x the measured rounding floor, at least the dtype's absolute
    floor. A floor of 0 was not measured (the trained dtype's floor needs a float64 reference: not on a GPU nor
    for huge models): it is then estimated from the logits' magnitude (one ulp of the largest logit per layer
    of depth, a generous stand-in)."""
    if floor <= 0.0 and logits.numel():
        floor = torch.finfo(dtype).eps * float(logits.abs().max().item()) * 32 if dtype.is_floating_point else 0.0
    return max(MERGE_TOLERANCE.get(dtype, 1e-4), FLOOR_FACTOR * floor)


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


def quantized_reference_logits(
    load_base: Callable[[], PreTrainedModel], adapter_dir: Path, probe: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of the trained model rebuilt from scratch: the saved adapter on a freshly loaded quantized base,
    computed by the quantized kernels — nothing the export or an evaluation did to the live model reaches it."""
    from mora_train.adapters import load_adapter

    rebuilt = load_adapter(load_base(), adapter_dir)
    logits = quantized_logits(rebuilt.model, probe)
    del rebuilt
    return logits


def check_quantized_kernels(
    adapter: Adapter, probe: dict[str, torch.Tensor], reference_logits: torch.Tensor | None = None
) -> KernelCheck:
    """De-quantize the adapter's base (the merge goes into those weights) and compare the adapted model on them
    with a reference computed by the quantized kernels: `reference_logits` (see quantized_reference_logits),
    else the live model's own forward, taken before de-quantization."""
    # No forward of ours may let bitsandbytes repack the weights it is about to de-quantize.
    keep_training_layout(adapter.model)
    reference = "the saved adapter on a freshly loaded quantized base"
    if reference_logits is None:
        reference_logits = quantized_logits(adapter.model, probe)
        reference = "the trained model's quantized forward"
    relative = kernel_relative_tolerance(adapter.model)
    adapter.dequantize_base()
    diff = float((logits_of(adapter.model, probe) - reference_logits.to(torch.float64)).abs().max().item())
    tolerance = kernel_tolerance(relative, reference_logits)
    log.info("de-quantized base vs %s: max |logit difference| %.3g, tolerance %.3g", reference, diff, tolerance)
    return KernelCheck(max_abs_diff=diff, tolerance=tolerance, reference=reference)


def kernel_tolerance(relative: float, reference_logits: torch.Tensor) -> float:
    """`relative` (models.quantization.kernel_relative_tolerance) of the reference's largest |logit|."""
    scale = float(reference_logits.abs().max().item()) if reference_logits.numel() else 0.0
    return relative * max(scale, 1.0)


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
        diff = float((logits_of(merged, probe, compare_dtype) - adapted_logits).abs().max().item())
        # Held in float32 (a 16-bit compute dtype's de-quantized base, cast up for the float64 reference), the
        # merged weights are checked as a float32 checkpoint; held in the 16-bit dtype, as one in that dtype.
        held = merge_tolerance(coarsest_float_dtype(merged), floor, adapted_logits)
        before_cast = BeforeCastCheck(max_abs_diff=diff, tolerance=held, dtype=dtype)
        # The reloaded checkpoint adds the cast's rounding to whatever the merge left (at most the above).
        tolerance = max(held, merge_tolerance(dtype, cast_floor, adapted_logits))
    as_module(merged).to(dtype)
    save_merged(merged, tokenizer, target)
    reloaded = reload_merged(target, dtype, trust_remote_code)
    as_module(reloaded).to(next(merged.parameters()).device)
    diff = (logits_of(reloaded, probe, compare_dtype) - adapted_logits).abs().max().item()
    result = ExportResult(
        merged_dir=target,
        max_abs_diff=diff,
        model=reloaded,
        tolerance=tolerance,
        kernel=kernel,
        before_cast=before_cast,
    )
    if before_cast is not None:
        log.info(
            "merged model before its cast to %s: max |logit difference| %.3g, tolerance %.3g (rounding floor %.3g x "
            "%g)",
            _dtype_name(dtype),
            before_cast.max_abs_diff,
            before_cast.tolerance,
            floor,
            FLOOR_FACTOR,
        )
    log.info(
        "merged checkpoint %s %s the adapted logits: max |difference| %.3g, tolerance %.3g (rounding floor %.3g x %g)",
        target,
        "reproduces" if result.merge_passed else "does NOT reproduce",
        diff,
        tolerance,
        cast_floor if coarser else floor,
        FLOOR_FACTOR,
    )
    return result


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

"""How the merged checkpoint is checked: the tolerance of its logits, which follows the rounding floor of the model
at hand, and, on a quantized base, the de-quantized weights against the quantized kernels."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from mora_train.adapters.base import Adapter
from mora_train.export.probe import logits_of, quantized_logits
from mora_train.models.quantization import keep_training_layout, kernel_relative_tolerance

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


def check_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype logits are compared in: float64 for a float32 model on CPU up to FLOAT64_CHECK_MAX_PARAMS
    parameters, else None (the model's own)."""
    first = next(model.parameters())
    small = sum(p.numel() for p in model.parameters()) <= FLOAT64_CHECK_MAX_PARAMS
    return torch.float64 if first.dtype == torch.float32 and first.device.type == "cpu" and small else None


def rounding_floor(model: torch.nn.Module, batch: dict[str, torch.Tensor], reference: torch.Tensor) -> float:
    """Max |logit change| between the model's forward in its own dtype and the float64 `reference`:
    the rounding noise of this model with these weights on this batch (0.0 when no float64 reference)."""
    own = logits_of(model, batch)
    return float((own - reference).abs().max().item()) if own.shape == reference.shape else 0.0


def dtype_name(dtype: torch.dtype) -> str:
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

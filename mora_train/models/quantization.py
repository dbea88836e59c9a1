"""4-bit and 8-bit base models through bitsandbytes: load, prepare for adapter training, de-quantize.

`model.quantization` = none | nf4 | fp4 | int8 (docs/adapters.md, "QMoRA"). The base's linear layers become
bitsandbytes `Linear4bit` / `Linear8bitLt` (both subclasses of `nn.Linear`, so adapters find and wrap them
like any linear layer); everything else (embeddings, norms, the LM head) stays in `model.dtype`.

Export never re-quantizes: `dequantize_linears` turns every quantized layer back into a float `nn.Linear`
holding exactly the weight its forward used (bitsandbytes computes `x @ dequantize(W)` on the base path),
and the adapter's ΔW is added to that. The merged checkpoint is therefore the model that was trained, up
to float rounding — unlike merging into the 4-bit weight, which re-quantizes W + ΔW and loses most of a
small ΔW (one nf4 step is ~1/8 of a block's absmax; a typical ΔW entry is far below it).

One thing can change what a 4-bit layer holds without anyone asking: on a CPU with AVX512-BF16
(bitsandbytes 0.50), the first forward in eval mode without gradients rewrites the weight in place
into a CPU-kernel layout (`quant_state.packing_format_for_cpu`: the codes re-ordered in blocks, the
per-block scales turned into a transposed bfloat16 tensor) and computes from then on in bfloat16.
`keep_training_layout` switches that off for every layer we train or export (build_adapter and
load_adapter call it), so evaluation computes with the weights training used; `dequantized_weight` still
reads either layout correctly, so a layer repacked before we saw it is exported as the weights its kernel
used (bf16 scales), and the merge check then compares against an independent reference.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, cast

import torch
from torch import nn

from mora_train.models.config import COMPUTE_DTYPES, STORAGE_DTYPES, ModelConfig

if TYPE_CHECKING:  # bitsandbytes itself is imported only where a quantized model needs it
    from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit

log = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def bitsandbytes_config(model: ModelConfig) -> Any:
    """transformers' BitsAndBytesConfig for this model section (None when not quantized)."""
    name = model.quantization_name
    if name == "none":
        return None
    from transformers import BitsAndBytesConfig

    options = model.quantization_options
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(options.int8_threshold))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=name,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[model.compute_dtype_name],
        bnb_4bit_quant_storage=STORAGE_DTYPES[options.storage_dtype],
    )


def quantized_device_map() -> dict[str, Any]:
    """Where bitsandbytes puts the quantized model: this process's GPU (LOCAL_RANK under a launcher), or the CPU."""
    import os

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


# -- a loaded model ------------------------------------------------------------------------------------


def is_quantized_linear(module: nn.Module) -> TypeGuard[nn.Linear]:
    """A bitsandbytes 4-bit or 8-bit linear layer (by class name: bitsandbytes is imported only when used)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4") and isinstance(
        module, nn.Linear
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear layer of `model` is a bitsandbytes quantized layer."""
    return any(is_quantized_linear(m) for m in model.modules())


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its quantized layers' compute dtype, else its first float parameter's."""
    for module in model.modules():
        if not is_quantized_linear(module):
            continue
        dtype = getattr(module, "compute_dtype", None)  # a 4-bit layer's: None until set or its first forward
        if isinstance(dtype, torch.dtype):
            return dtype
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def set_plain_attribute(module: nn.Module, name: str, value: object) -> None:
    """`module.<name> = value` for an attribute that is neither a tensor nor a module (a flag, transformers'
    hf_quantizer): exactly that assignment, which torch's stubs refuse to type-check (they type every attribute
    assigned on an nn.Module as Tensor | Module)."""
    setattr(module, name, value)


def is_repacked_for_cpu(module: nn.Module) -> bool:
    """Whether bitsandbytes rewrote this 4-bit layer's weight into its AVX512-BF16 CPU-kernel layout."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _training_layout_of_repacked(weight: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """(codes, quant state) in the plain layout for a weight bitsandbytes repacked for its CPU kernel, built
    on copies: the layer itself is not changed. The scales are the bf16 ones that kernel used, as float32 —
    the float32 (or double-quantized) scales of before the repack are gone."""
    import bitsandbytes.functional as F

    # bitsandbytes' own inverse re-orders the codes exactly, but would re-quantize bf16 scales that had been
    # double-quantized (a lossy 8-bit round trip): give it a copy of the state that does not ask for that,
    # and undo the scales' transposed [K / blocksize, N] layout here.
    state = copy.copy(quant_state)
    state.original_nested = False
    codes, _ = F._convert_weight_packed_for_cpu_inverse(weight.data, state)
    scales = quant_state.absmax.T.reshape(-1).float()
    plain = F.QuantState(
        absmax=scales,
        shape=quant_state.shape,
        code=quant_state.code,
        blocksize=quant_state.blocksize,
        quant_type=quant_state.quant_type,
        dtype=getattr(quant_state, "original_dtype", quant_state.dtype),
    )
    return codes, plain


def keep_training_layout(model: nn.Module) -> int:
    """Keep every 4-bit layer of `model` in the layout it trains with: no in-place repack for bitsandbytes'
    AVX512-BF16 CPU kernel on eval forwards, and any layer already repacked put back into the plain layout
    (with the bf16 scales its kernel used: the earlier scales are gone). Returns how many were put back."""
    restored = 0
    for module in model.modules():
        if not is_quantized_linear(module) or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        layer = cast("Linear4bit", module)  # only bitsandbytes' 4-bit layers have support_avx512bf16_for_cpu
        layer.support_avx512bf16_for_cpu = False
        if is_repacked_for_cpu(layer):
            weight = cast("Params4bit", layer.weight)  # nn.Linear types it a Tensor; a 4-bit layer's is a Params4bit
            codes, plain = _training_layout_of_repacked(weight, weight.quant_state)
            weight.data = codes
            weight.quant_state = plain
            layer.quant_state = plain
            restored += 1
    if restored:
        log.warning(
            "%d 4-bit layers had been repacked in place by bitsandbytes for its AVX512-BF16 CPU kernel (an eval "
            "forward before mora-train saw the model); they are back in the training layout, with the bfloat16 "
            "block scales that kernel used (the original float32 scales are gone)",
            restored,
        )
    return restored


@torch.no_grad()
def dequantized_weight(module: nn.Linear) -> torch.Tensor:
    """The float32 weight a quantized linear layer's forward multiplies by (d_out x d_in); a float layer's own
    weight. Either 4-bit layout (plain, or repacked for the CPU kernel) is read as what it holds."""
    weight = module.weight
    if not is_quantized_linear(module):
        return weight.detach().float()
    import bitsandbytes.functional as F

    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and is_repacked_for_cpu(module):
        codes, plain = _training_layout_of_repacked(weight, quant_state)
        return F.dequantize_4bit(codes, plain).float()
    if quant_state is not None:  # 4-bit: packed codes + per-block absmax (itself quantized with double_quant)
        return F.dequantize_4bit(weight.data, quant_state).float()
    # LLM.int8: int8 codes with one absmax scale per output row; before the layer first moves to its device
    # the weight is still float (Int8Params quantizes on .to/.cuda).
    if weight.dtype != torch.int8:
        return weight.detach().float()
    scale: torch.Tensor | None = getattr(weight, "SCB", None)
    if scale is None:
        scale = cast("Linear8bitLt", module).state.SCB  # an int8 weight is a Linear8bitLt's
    if scale is None:  # bitsandbytes keeps them on the weight or the layer's matmul state once it quantized
        raise RuntimeError(f"{type(module).__name__} layer: its int8 weight has no row scales (SCB)")
    return F.int8_vectorwise_dequant(weight.data, scale).float()


@contextlib.contextmanager
def training_kernels(model: nn.Module) -> Iterator[None]:
    """Run the quantized layers of `model` in training mode (everything else as it is) for the forwards inside.

    bitsandbytes picks its kernel by the layer's mode, and only the training one computes the model that
    trained: on CPU an int8 layer trains with de-quantize + float matmul (MatMul8bitFp) but evaluates with
    LLM.int8's int8 activations, and a 4-bit layer in eval mode may be repacked for the AVX512-BF16 kernel."""
    switched = [m for m in model.modules() if is_quantized_linear(m) and not m.training]
    for module in switched:
        module.train()
    try:
        yield
    finally:
        for module in switched:
            module.eval()


# The export's kernel check (export.check_quantized_kernels) compares the training-time quantized forward with
# the same adapted model on its de-quantized weights; its tolerance is this fraction of the largest |logit|.
# 4-bit layers (and int8 on CPU, which trains with de-quantize + float matmul) compute x @ dequantize(W) in the
# compute dtype, as the de-quantized model does. Measured on CPU: 0.0 for 4-bit (tiny Llama and SmolLM2-135M,
# float32 and bfloat16 compute), 1.4-1.8e-6 x for int8 on SmolLM2 (the scales applied in another order). The
# tolerance leaves room for kernels that sum in another order (GPU) while a misread de-quantization, which moves
# the logits by their own size (0.8-1.3 x the largest |logit|, tiny Llama and SmolLM2), fails in every dtype,
# and so, in float32, do bfloat16 block scales (a base repacked for the AVX512-BF16 kernel before the adapter
# was attached: 1.1-1.6e-3 x on the tiny Llama, 7.3e-3 x on SmolLM2).
KERNEL_RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# LLM.int8 on a GPU trains with int8 activations (outliers above int8_threshold kept in float16): its kernel then
# differs from the de-quantized model by that quantization. bitsandbytes' CPU emulation of it (the eval-mode
# kernel there) moves SmolLM2-135M's logits by 9-12 % of the largest on text, 15-19 % on random tokens (not
# measured on a GPU); 0.5 leaves room for that on deeper models and still fails a misread de-quantization.
INT8_ACTIVATIONS_RELATIVE_TOLERANCE = 0.5


def kernel_relative_tolerance(model: nn.Module) -> float:
    """The kernel check's tolerance for `model`, relative to its largest |logit| (see the constants above)."""
    int8_activations = any(
        type(m).__name__ == "Linear8bitLt" and m.weight.device.type not in ("cpu", "xpu") for m in model.modules()
    )
    if int8_activations:
        return INT8_ACTIVATIONS_RELATIVE_TOLERANCE
    return KERNEL_RELATIVE_TOLERANCE.get(compute_dtype(model), KERNEL_RELATIVE_TOLERANCE[torch.bfloat16])


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class DequantizedLinear(nn.Linear):
    """A float `nn.Linear` standing in for a de-quantized bitsandbytes layer, computing as that layer did: the
    input cast to the weight's dtype (the compute dtype), the output cast back to the input's dtype. peft's
    k-bit preparation leaves the hidden states in float32, so a plain bfloat16 `nn.Linear` there would be fed
    float32 inputs. Its state dict is a plain `nn.Linear`'s: a saved model reloads with `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@torch.no_grad()
def dequantize_linears(model: ModuleT, dtype: torch.dtype | None = None) -> ModuleT:
    """Replace every quantized linear layer of `model` (also inside adapter wrappers) by a `DequantizedLinear`
    holding its de-quantized weight, in `dtype` (default: the compute dtype). The model then computes what it
    did, minus the quantized kernels' own rounding (none for 4-bit on CPU, whose forward is x @ dequantize(W))."""
    target = dtype or compute_dtype(model)
    repacked = sum(is_repacked_for_cpu(m) for m in model.modules() if is_quantized_linear(m))
    if repacked:
        log.warning(
            "%d 4-bit layers are in bitsandbytes' AVX512-BF16 CPU-kernel layout (repacked in place by an eval "
            "forward): they are de-quantized from it, with the bfloat16 block scales that kernel used",
            repacked,
        )
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight = dequantized_weight(module)
        plain = DequantizedLinear(
            module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=target
        )
        plain.weight.copy_(weight.to(target))
        if module.bias is not None:
            plain.bias.copy_(module.bias.detach().to(target))
        plain.requires_grad_(False)
        set_submodule(model, name, plain)
    return model


def forget_quantization(model: nn.Module) -> None:
    """Drop transformers' record that the model was loaded quantized (its layers are float now), so that
    save_pretrained writes a plain checkpoint and `.to(dtype)` is allowed."""
    if getattr(model, "hf_quantizer", None) is not None:
        set_plain_attribute(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):  # is_quantized: `.float()` refuses
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if config is not None and getattr(config, "_is_quantized", False):
        config._is_quantized = False
    if hasattr(model, "quantization_method"):
        with contextlib.suppress(AttributeError):
            del model.quantization_method


def as_float32(model: ModuleT) -> ModuleT:
    """`model` in float32, in place: its quantized layers de-quantized (the weights their kernels multiply by),
    transformers' record of the quantization dropped, everything else cast (`.float()` alone is refused on a
    quantized model)."""
    if is_quantized(model):
        dequantize_linears(model, torch.float32)
        forget_quantization(model)
    return model.float()


def prepare_for_adapter_training(model: nn.Module) -> None:
    """peft's k-bit preparation for every adapter method: keep the 4-bit layers in their training layout
    (`keep_training_layout`), freeze the base, cast non-quantized half-precision weights (norms, embeddings)
    to float32 for stable training. Gradient checkpointing is left to the trainer
    (trainer.gradient_checkpointing), which enables input gradients itself."""
    from peft import prepare_model_for_kbit_training

    keep_training_layout(model)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@contextlib.contextmanager
def adapters_attached(model: nn.Module) -> Iterator[None]:
    """Tell transformers' Trainer that trainable adapters sit on this quantized model.

    Its constructor refuses a quantized model unless it is a peft model ("purely quantized models" cannot be
    fine-tuned); MoRA's layers are not peft's, so the flag peft's own integration sets is set while the
    Trainer is built, and restored after (it changes what save_pretrained writes, which we never call on
    the live model, but nothing else should see it)."""
    if not is_quantized(model) or getattr(model, "_hf_peft_config_loaded", False):
        yield
        return
    set_plain_attribute(model, "_hf_peft_config_loaded", True)
    try:
        yield
    finally:
        set_plain_attribute(model, "_hf_peft_config_loaded", False)


def logical_numel(param: torch.Tensor) -> int:
    """Entries of the weight a parameter stands for: a packed 4-bit weight (bitsandbytes Params4bit, with a
    quant_state) counts its d_out x d_in entries, not its bytes of codes; any other tensor its numel()."""
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()

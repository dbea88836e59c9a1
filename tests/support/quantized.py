"""Quantized-base helpers for the export tests: a tiny trained adapter on a nf4 / fp4 / int8 base, and the
AVX512-BF16 CPU path of bitsandbytes reproduced on any CPU.

On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` rewrites its weight in place on the first eval
forward without gradients (`functional._convert_weight_packed_for_cpu`: codes re-ordered in blocks, block
scales turned into a transposed bfloat16 tensor) and from then on computes with a bfloat16 kernel for that
layout. `machine_with_avx512bf16` makes every 4-bit layer behave so (its flag, and that kernel's arithmetic
in plain torch, so no CPU instruction is needed); `repack_like_the_cpu_kernel` applies the rewrite itself.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mora_train.adapters import ADAPTER_TYPES, Adapter, AdapterSettings, build_adapter
from mora_train.core.io import write_dir_atomically
from mora_train.models import load_model_and_tokenizer
from mora_train.models.config import ModelConfig
from mora_train.pipeline.run_config import read_run_config
from tests.conftest import compose_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora": {"name": "lora", "alpha": 16},
    "sharing": {"name": "mora", "mora_type": "sharing"},
    "rope": {"name": "mora", "mora_type": "rope"},
}


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """bitsandbytes' own 4-bit layers (peft's LoRA wrapper around one has the same class name)."""
    return [
        m for m in model.modules() if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
    ]


def is_repacked(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def simulated_cpu_kernel(original: Any) -> Any:
    """bitsandbytes.functional.gemv_4bit that computes, for a repacked weight, what the AVX512-BF16 kernel
    computes (bfloat16 input and scales, bfloat16 output), from bitsandbytes' own inverse of the repack; any
    other weight goes to `original`."""
    import bitsandbytes.functional as F

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return original(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
        copied = copy.copy(state)
        copied.original_nested = False  # the scales are taken below; bitsandbytes would re-quantize them
        codes, _ = F._convert_weight_packed_for_cpu_inverse(B, copied)
        scales = state.absmax.T.reshape(-1).float()
        plain = F.QuantState(
            absmax=scales,
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=torch.float32,
        )
        weight = F.dequantize_4bit(codes, plain).float()
        result = torch.nn.functional.linear(A.to(torch.bfloat16).float(), weight).to(torch.bfloat16).to(A.dtype)
        if out is not None:
            return out.copy_(result)
        return result

    return gemv_4bit


def machine_with_avx512bf16(monkeypatch: Any) -> None:
    """From now on, new 4-bit layers believe the CPU has AVX512-BF16, and the repacked kernel is simulated."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn import modules

    monkeypatch.setattr(F, "gemv_4bit", simulated_cpu_kernel(F.gemv_4bit))
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)


def repack_like_the_cpu_kernel(model: nn.Module) -> int:
    """Rewrite every 4-bit layer of `model` as `Linear4bit.forward` does on an AVX512-BF16 CPU; return how many."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layers = [m for m in four_bit_layers(model) if not is_repacked(m)]
    for layer in layers:
        layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    return len(layers)


def typed_model(*overrides: str) -> ModelConfig:
    """The typed `model` section of a composed config (checked: no problem expected)."""
    run, problems = read_run_config(compose_config(list(overrides)))
    assert problems == [], problems
    return run.model


def tiny_model_cfg(quantization: str, *options: str) -> ModelConfig:
    """The tiny Llama on a `quantization` base; `options`: more overrides (model.quantization_options.*=...)."""
    return typed_model("model=tiny-llama", f"model.quantization={quantization}", *options)


def adapter_settings(adapter: str) -> AdapterSettings:
    """The typed `adapter` section of ADAPTERS[adapter] on every linear layer of the tiny Llama."""
    values = ADAPTERS[adapter]
    return ADAPTER_TYPES[values["name"]].settings_type(**values, target_modules=TARGETS, dropout=0.0)


def load_base(quantization: str, *options: str) -> nn.Module:
    return load_model_and_tokenizer(tiny_model_cfg(quantization, *options))[0]


def probe_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (4, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trained_adapter(
    quantization: str, adapter: str, steps: int = 3, rank: int = 8, options: tuple[str, ...] = ()
) -> tuple[Adapter, Any]:
    """A tiny Llama on a `quantization` base with `adapter` (ADAPTERS) trained `steps` AdamW steps at lr 1e-2."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_cfg(quantization, *options))
    built = build_adapter(model, adapter_settings(adapter), rank)
    probe = probe_batch()
    optimizer = torch.optim.AdamW(built.trainable_parameters().values(), lr=1e-2)
    built.model.train()
    for _ in range(steps):
        built.model(**probe, labels=probe["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return built, tokenizer


def save_adapter(adapter: Adapter, folder: Path) -> Path:
    write_dir_atomically(folder, adapter.save)
    return folder


@torch.no_grad()
def eval_forward(model: nn.Module) -> None:
    """What an evaluation does: eval mode, no gradients (the forward that repacks on AVX512-BF16 CPUs)."""
    model.eval()
    model(**probe_batch())


def write_custom_code_model(folder: Path) -> Path:
    """A tiny random Llama whose config names its classes through `auto_map` in a local .py file (a model
    that needs model.trust_remote_code=true), saved with save_pretrained's files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "custom_llama.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomLlamaConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n\n"
        "class CustomLlamaForCausalLM(LlamaForCausalLM):\n    config_class = CustomLlamaConfig\n"
    )
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    import json

    saved = json.loads((folder / "config.json").read_text())
    saved["model_type"] = "custom_llama"
    saved["architectures"] = ["CustomLlamaForCausalLM"]
    saved["auto_map"] = {
        "AutoConfig": "custom_llama.CustomLlamaConfig",
        "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder

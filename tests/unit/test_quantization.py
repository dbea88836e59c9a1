"""QMoRA / QLoRA on the tiny random Llama in nf4, fp4 and int8 (bitsandbytes runs these layers on CPU).

For LoRA and every MoRA type: the base stays quantized and frozen, only adapter parameters get gradients,
the loss falls, the merged (de-quantized) export reproduces the trained model's logits within the merge
check's tolerance, and a saved adapter re-attached to a freshly quantized base reproduces its logits exactly.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from mora_train.adapters import ADAPTER_TYPES, build_adapter, load_adapter
from mora_train.adapters.full import FullSettings
from mora_train.adapters.mora.layer import MORA_TYPES
from mora_train.core.io import write_dir_atomically
from mora_train.export import export_merged, quantized_logits
from mora_train.models import load_model_and_tokenizer
from mora_train.models.quantization import dequantized_weight, is_quantized, is_quantized_linear, keep_training_layout
from tests.conftest import compose_config

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DoRA: its update depends on W, which it reads de-quantized (peft supports it on 4-/8-bit bases).
ADAPTERS = [{"name": "lora", "alpha": 16}, {"name": "lora", "alpha": 16, "use_dora": True}]
ADAPTERS += [{"name": "mora", "mora_type": t} for t in MORA_TYPES]
# DoRA on int8 is refused without a GPU (test_lora_family.py): peft's CPU path loses the 8-bit row scales.
CASES = [(q, a) for q in ("nf4", "fp4", "int8") for a in ADAPTERS if not (q == "int8" and a.get("use_dora"))]


def case_id(case: tuple[str, dict]) -> str:
    quantization, adapter = case
    return f"{quantization}-{adapter.get('mora_type', 'dora' if adapter.get('use_dora') else adapter['name'])}"


def tiny_model_cfg(quantization: str):
    from tests.support.quantized import tiny_model_cfg as typed

    return typed(quantization)


def build(quantization: str, adapter: dict, rank: int = 8):
    model, tokenizer = load_model_and_tokenizer(tiny_model_cfg(quantization))
    settings = ADAPTER_TYPES[adapter["name"]].settings_type(**adapter, target_modules=TARGETS, dropout=0.0)
    return build_adapter(model, settings, rank), tokenizer


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (4, 24), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(autouse=True)
def quiet_bitsandbytes():
    with warnings.catch_warnings():
        # bitsandbytes' int8 CPU path says on every call that it casts inputs to float16 for quantization.
        warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
        yield


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_quantized_base_trains_only_the_adapter_and_merges_exactly(case, tmp_path: Path) -> None:
    quantization, adapter_settings = case
    adapter, tokenizer = build(quantization, adapter_settings)
    base_layers = [m for m in adapter.base_model.modules() if is_quantized_linear(m)]
    assert base_layers and is_quantized(adapter.model), "the base must stay quantized under the adapter"
    codes = {id(m): m.weight.detach().clone() for m in base_layers}

    probe = batch()
    trainable = adapter.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = adapter.model(**probe, labels=probe["input_ids"]).loss
        loss.backward()
        with_grad = {n for n, p in adapter.model.named_parameters() if p.grad is not None}
        assert with_grad == {n for n, p in adapter.model.named_parameters() if p.requires_grad}
        assert len(with_grad) == len(trainable) > 0
        assert all(p.dtype == torch.float32 for p in trainable.values()), "adapter weights train in float32"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall: {losses}"
    assert all(torch.equal(m.weight, codes[id(m)]) for m in base_layers), "the quantized base weights changed"

    # Save -> load onto a freshly quantized base: the same logits, bit for bit.
    trained_logits = adapter.model(**probe).logits.detach()
    write_dir_atomically(tmp_path / "adapter", adapter.save)
    fresh, _ = load_model_and_tokenizer(tiny_model_cfg(quantization))
    reloaded = load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(reloaded.model(**probe).logits.detach(), trained_logits)

    # The merged export: de-quantized, float, and the trained model's logits within the check's tolerance,
    # checked against the re-attached adapter's quantized forward (independent of the export).
    result = export_merged(
        adapter, tokenizer, probe, tmp_path / "merged", quantized_reference=quantized_logits(reloaded.model, probe)
    )
    assert result.passed, result.failure_message(tmp_path / "adapter")
    assert result.max_abs_diff <= 1e-4
    assert result.quantized_kernel_diff <= result.quantized_kernel_tolerance
    assert not is_quantized(result.model)
    assert not hasattr(result.model.config, "quantization_config")
    assert result.model.dtype == torch.float32


def test_dequantized_weight_is_what_the_4bit_forward_multiplies_by() -> None:
    model, _ = load_model_and_tokenizer(tiny_model_cfg("nf4"))
    keep_training_layout(model)  # as build_adapter does: no repack for the AVX512-BF16 kernel (test_quantized_export)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features)
    assert torch.allclose(layer(x), x @ dequantized_weight(layer).T, atol=1e-6)


def test_merge_goes_into_dequantized_weights_not_requantized(tmp_path: Path) -> None:
    """A small ΔW survives the merge: re-quantizing W + ΔW to nf4 would have rounded most of it away."""
    adapter, _tokenizer = build("nf4", {"name": "mora", "mora_type": "sharing"})
    with torch.no_grad():
        for layer in adapter.modules.values():
            layer.mora_M.normal_(0, 1e-4)
    deltas = adapter.delta_weights()
    name = next(iter(deltas))
    before = dequantized_weight(adapter.base_model.get_submodule(name).base_layer)
    merged = adapter.merge_and_unload()
    after = merged.get_submodule(name).weight.float()
    assert torch.allclose(after - before, deltas[name], atol=1e-6)


def test_full_fine_tuning_on_a_quantized_base_is_refused_when_built() -> None:
    from mora_train.core.errors import MoraTrainError

    model, _ = load_model_and_tokenizer(tiny_model_cfg("nf4"))
    with pytest.raises(MoraTrainError, match="full fine-tuning updates the base weights"):
        build_adapter(model, FullSettings(name="full", target_modules="all"), 8)


def test_bad_quantization_combinations_are_all_listed_at_once() -> None:
    from mora_train.core.errors import ConfigError
    from tests.conftest import validate_config as validate

    cfg = compose_config(
        [
            "model=tiny-llama",
            "model.quantization=int8",
            "adapter=full",
            "distributed=fsdp",
            "model.quantization_options.compute_dtype=float16",
            "+model.quantization_options.blocksize=32",
        ]
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    for expected in (
        "`adapter=full` with `model.quantization=int8`",
        "compute_dtype=float16",
        "quantization_options.blocksize",
        "`model.quantization=int8` with `distributed=fsdp`",
    ):
        assert expected in text, text
    cfg = compose_config(["model=tiny-llama", "model.quantization=q3", "adapter=mora", "trainer.restart.every_steps=4"])
    with pytest.raises(ConfigError, match=re.escape("`model.quantization=q3` is unknown")):
        validate(cfg)
    cfg = compose_config(
        ["model=tiny-llama", "model.quantization=nf4", "adapter=mora", "trainer.restart.every_steps=4"]
    )
    with pytest.raises(ConfigError, match=r"every_steps=4.*model.quantization=nf4"):
        validate(cfg)

"""The merged checkpoint of a quantized run is the trained model, or the run says loudly that it is not.

Every case runs on any CPU: the AVX512-BF16 path of bitsandbytes (an eval forward repacks 4-bit weights in
place for a bfloat16 kernel) is reproduced by tests/support/quantized.py, so the layout that broke the
export on such machines is tested on machines without it too. The reference is always independent of the
export: the saved adapter re-attached to a freshly loaded quantized base, computed by its quantized kernels.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from mora_train.adapters import load_adapter
from mora_train.adapters.mora.layer import MoRALinear
from mora_train.core.errors import MoraTrainError
from mora_train.export import export_merged, logits_of, quantized_logits
from mora_train.models import quantization
from mora_train.models.quantization import (
    dequantized_weight,
    keep_training_layout,
    kernel_relative_tolerance,
)
from tests.support.quantized import (
    eval_forward,
    four_bit_layers,
    is_repacked,
    load_base,
    machine_with_avx512bf16,
    probe_batch,
    repack_like_the_cpu_kernel,
    save_adapter,
    trained_adapter,
    write_custom_code_model,
)

pytest.importorskip("bitsandbytes")

CASES = [
    (q, a, layout)
    for q in ("nf4", "fp4", "int8")
    for a in ("lora", "sharing", "rope")
    for layout in (("plain", "repacked") if q != "int8" else ("plain",))
]


@pytest.fixture(autouse=True)
def avx512bf16_cpu(monkeypatch: pytest.MonkeyPatch):
    """Every test here runs as on a CPU with AVX512-BF16, whatever this machine has."""
    machine_with_avx512bf16(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inputs will be cast.*")  # bitsandbytes' int8 CPU path
        yield


def rebuilt_logits(quantization_name: str, adapter_dir: Path) -> torch.Tensor:
    """The trained model from scratch: the saved adapter on a freshly loaded quantized base."""
    return quantized_logits(load_adapter(load_base(quantization_name), adapter_dir).model, probe_batch())


def merged_logits(folder: Path) -> torch.Tensor:
    return logits_of(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), probe_batch())


@pytest.mark.parametrize("quant,adapter_name,layout", CASES, ids=["-".join(c) for c in CASES])
def test_merged_checkpoint_is_the_model_rebuilt_from_the_saved_adapter(quant, adapter_name, layout, tmp_path) -> None:
    adapter, tokenizer = trained_adapter(quant, adapter_name)
    assert not any(is_repacked(m) for m in four_bit_layers(adapter.model)), "training repacked the base"
    adapter_dir = save_adapter(adapter, tmp_path / "adapter")
    reference = rebuilt_logits(quant, adapter_dir)
    relative = kernel_relative_tolerance(adapter.model)
    if layout == "repacked":
        # What an eval forward did before the export on an AVX512-BF16 CPU when nothing kept the layout.
        assert repack_like_the_cpu_kernel(adapter.model) > 0
    eval_forward(adapter.model)
    assert not any(is_repacked(m) for m in four_bit_layers(adapter.model)) or layout == "repacked"

    result = export_merged(adapter, tokenizer, probe_batch(), tmp_path / "merged", quantized_reference=reference)
    scale = max(float(reference.abs().max()), 1.0)
    against_rebuild = float((merged_logits(tmp_path / "merged") - reference).abs().max())
    if layout == "plain":
        assert result.passed, result.failure_message(adapter_dir)
        assert result.quantized_kernel_diff <= result.quantized_kernel_tolerance == pytest.approx(relative * scale)
        assert against_rebuild <= relative * scale + result.tolerance, against_rebuild
    else:
        # The repack replaced the float32 block scales by bfloat16 ones: the export reads that layout right (the
        # merged model is within bfloat16 rounding of the trained one, not the 0.8-1.2 x |logit| of a misread
        # layout), but in a float32 run that is not the trained model, and the check says so.
        assert against_rebuild <= 2**-7 * scale, against_rebuild
        assert not result.passed and result.merge_passed
        message = result.failure_message(adapter_dir)
        assert (
            f"{result.quantized_kernel_diff:.3g}" in message and f"{result.quantized_kernel_tolerance:.3g}" in message
        )


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_a_base_repacked_before_the_export_is_exported_as_its_kernel_computes(quant, tmp_path) -> None:
    """Without an independent reference (the live model's own kernels), a repacked base is put back into the
    training layout with the scales its kernel used, and merged/ holds exactly those weights + ΔW."""
    adapter, tokenizer = trained_adapter(quant, "sharing")
    repack_like_the_cpu_kernel(adapter.model)
    eval_forward(adapter.model)
    deltas = adapter.delta_weights()
    name = next(iter(deltas))
    expected = dequantized_weight(adapter.base_model.get_submodule(name).base_layer) + deltas[name]
    result = export_merged(adapter, tokenizer, probe_batch(), tmp_path / "merged")
    assert result.passed and result.quantized_kernel_diff <= result.quantized_kernel_tolerance
    assert torch.allclose(result.model.get_submodule(name).weight.float(), expected, atol=1e-6)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_dequantized_weight_reads_both_layouts_without_changing_the_layer(quant) -> None:
    model = load_base(quant)
    keep_training_layout(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features)
    plain = dequantized_weight(layer)
    eval_forward(model)
    assert not is_repacked(layer), "an eval forward repacked a layer kept in the training layout"
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ plain.T, atol=1e-6)

    repack_like_the_cpu_kernel(model)
    codes = layer.weight.data.clone()
    packed = dequantized_weight(layer)
    assert is_repacked(layer) and torch.equal(layer.weight.data, codes), "de-quantizing changed the layer"
    # The same codes with bfloat16 scales: within bf16 rounding of each weight, and not a misread layout.
    assert torch.allclose(packed, plain, rtol=2**-8, atol=0.0)
    import bitsandbytes.functional as F

    misread = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # the old bug
    assert (misread - plain).abs().max() > 10 * (packed - plain).abs().max()

    # Put back into the training layout: the layer then computes with exactly those weights.
    assert keep_training_layout(model) > 0 and not is_repacked(layer)
    assert torch.equal(dequantized_weight(layer), packed)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ packed.T, atol=1e-6)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("reference", ["rebuild", "live"])
def test_a_wrong_dequantization_fails_the_merge_check(quant, reference, tmp_path, monkeypatch) -> None:
    adapter, tokenizer = trained_adapter(quant, "rope")
    adapter_dir = save_adapter(adapter, tmp_path / "adapter")
    rebuilt = rebuilt_logits(quant, adapter_dir) if reference == "rebuild" else None
    right = quantization.dequantized_weight
    if quant == "nf4":
        import bitsandbytes.functional as F

        # The bug this guards against: a repacked layout read as the plain one.
        def wrong(module):
            if hasattr(module.weight, "quant_state"):
                repack_like_the_cpu_kernel(module)
                return F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            return right(module)
    else:

        def wrong(module):
            weight = right(module).clone()
            weight[0] *= 1.05
            return weight

    monkeypatch.setattr(quantization, "dequantized_weight", wrong)
    result = export_merged(adapter, tokenizer, probe_batch(), tmp_path / "merged", quantized_reference=rebuilt)
    assert not result.passed and result.quantized_kernel_diff > result.quantized_kernel_tolerance
    assert result.merge_passed  # the merge itself was faithful to the (wrong) weights: only the kernel check sees it
    assert "de-quantized weights do not compute what the quantized kernels compute" in result.failure_message(
        adapter_dir
    )


def test_mora_trains_after_an_eval_forward_on_a_4bit_base() -> None:
    adapter, _ = trained_adapter("nf4", "sharing", steps=1)
    eval_forward(adapter.model)
    adapter.model.train()
    probe = probe_batch()
    adapter.model(**probe, labels=probe["input_ids"]).loss.backward()
    grads = [p.grad for p in adapter.trainable_parameters().values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


class ViewReturningLinear(torch.nn.Linear):
    """A base layer whose output is a view of another tensor (as some quantized kernels return it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).reshape(-1).view(x.shape[0], self.out_features)


def test_mora_layer_on_a_base_that_returns_a_view_trains_and_computes_the_same() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40)
    viewing = ViewReturningLinear(48, 40)
    viewing.load_state_dict(plain.state_dict())
    layers = [MoRALinear(base, rank=4, mora_type="sharing") for base in (plain, viewing)]
    with torch.no_grad():
        layers[0].mora_M.normal_()
        layers[1].mora_M.copy_(layers[0].mora_M)
    x = torch.randn(6, 48, requires_grad=True)
    outputs = [layer(x) for layer in layers]
    assert torch.equal(outputs[0], outputs[1])
    outputs[1].sum().backward()  # raised "a view of a leaf Variable ... in-place operation" before
    assert layers[1].mora_M.grad is not None and x.grad is not None


def test_an_adapter_on_a_repacked_base_is_attached_in_the_training_layout(tmp_path) -> None:
    adapter, _ = trained_adapter("nf4", "rope", steps=1)
    adapter_dir = save_adapter(adapter, tmp_path / "adapter")
    base = load_base("nf4")
    eval_forward(base)  # repacks every layer: a base evaluated before the adapter was attached
    assert all(is_repacked(m) for m in four_bit_layers(base))
    reattached = load_adapter(base, adapter_dir)
    assert not any(is_repacked(m) for m in four_bit_layers(reattached.model))
    eval_forward(reattached.model)
    assert not any(is_repacked(m) for m in four_bit_layers(reattached.model))


# -- mora-train-export on a quantized run -------------------------------------------------------------------


@pytest.mark.integration  # starts an interpreter (the plain-peft check or the export CLI)
@pytest.mark.parametrize("quant,adapter_name", [("nf4", "sharing"), ("int8", "lora")])
def test_export_run_on_a_quantized_run_passes_the_plain_peft_check(quant, adapter_name, tmp_path) -> None:
    from peft import PeftModel

    from mora_train.models.quantization import as_float32
    from mora_train.pipeline.lora_export import export_run
    from tests.conftest import TINY_RUN, compose_config

    run_dir = tmp_path / "run"
    adapter, _ = trained_adapter(quant, adapter_name)
    save_adapter(adapter, run_dir / "adapter")
    cfg = compose_config(
        [*TINY_RUN, f"model.quantization={quant}", f"adapter={'lora' if adapter_name == 'lora' else 'mora'}"]
    )
    OmegaConf.save(cfg, run_dir / "resolved_config.yaml", resolve=True)

    report = export_run(run_dir, tmp_path / "exported")
    assert report["base_quantization"] == quant and report["peft_max_abs_logit_diff"] < 1e-4
    # The folder on the de-quantized base computes the trained model (its quantized kernels, rebuilt).
    served = PeftModel.from_pretrained(as_float32(load_base(quant)), str(tmp_path / "exported"))
    reference = rebuilt_logits(quant, run_dir / "adapter")
    tolerance = kernel_relative_tolerance(load_base(quant)) * max(float(reference.abs().max()), 1.0)
    assert float((logits_of(served, probe_batch()) - reference).abs().max()) <= tolerance


# -- model.trust_remote_code ---------------------------------------------------------------------------------


@pytest.fixture
def no_stdin(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"stdin was read: {args}")

    monkeypatch.setattr("builtins.input", refuse)


def custom_code_cfg(folder: Path, quant: str = "none"):
    from tests.support.quantized import typed_model

    return typed_model(
        "model=tiny-llama",
        f"model.name_or_path={folder}",
        "~model.random_init",
        "model.trust_remote_code=true",
        f"model.quantization={quant}",
    )


def test_a_custom_code_model_merges_and_reloads_without_reading_stdin(tmp_path, no_stdin) -> None:
    from mora_train.adapters import build_adapter
    from mora_train.models import load_model_and_tokenizer
    from tests.support.quantized import adapter_settings

    cfg = custom_code_cfg(write_custom_code_model(tmp_path / "custom"), "nf4")
    model, tokenizer = load_model_and_tokenizer(cfg)
    adapter = build_adapter(model, adapter_settings("sharing"), 8)
    with torch.no_grad():
        for param in adapter.trainable_parameters().values():
            param.normal_(0, 1e-2)
    adapter_dir = save_adapter(adapter, tmp_path / "adapter")
    reference = quantized_logits(load_adapter(load_model_and_tokenizer(cfg)[0], adapter_dir).model, probe_batch())
    result = export_merged(
        adapter, tokenizer, probe_batch(), tmp_path / "merged", quantized_reference=reference, trust_remote_code=True
    )
    assert result.passed, result.failure_message(adapter_dir)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "custom_llama"


@pytest.mark.integration  # starts an interpreter (the plain-peft check or the export CLI)
def test_the_plain_peft_check_of_a_custom_code_base_fails_in_one_line_and_keeps_its_output(tmp_path) -> None:
    from mora_train.export import PEFT_CHECK_LOG, check_with_peft, export_lora
    from mora_train.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(custom_code_cfg(write_custom_code_model(tmp_path / "custom")))
    export_lora({"model.layers.0.self_attn.q_proj": (torch.zeros(64, 2), torch.zeros(2, 64))}, tmp_path / "exported")
    with pytest.raises(MoraTrainError) as err:
        check_with_peft(base, tmp_path / "exported", base, trust_remote_code=False)  # the flag not passed on
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "trust_remote_code" in message, message
    log = (tmp_path / "exported" / PEFT_CHECK_LOG).read_text()
    assert str(tmp_path / "exported" / PEFT_CHECK_LOG) in message and "Traceback" in log
    assert check_with_peft(base, tmp_path / "exported", base, trust_remote_code=True) < 1e-5

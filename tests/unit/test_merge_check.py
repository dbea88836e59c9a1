"""The merge check follows the model's float rounding floor: a large correct ΔW passes, a wrong ΔW fails —
also for a checkpoint written in a 16-bit dtype coarser than the float32 the model computed in."""

from __future__ import annotations

import pytest
import torch

from mora_train.adapters import build_adapter
from mora_train.export import (
    FLOOR_FACTOR,
    MERGE_TOLERANCE,
    export_merged,
    export_rounding_floor,
    logits_of,
    merge_tolerance,
    probe_batch,
    save_merged,
)
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import read_run_config
from tests.conftest import compose_config

SIXTEEN_BIT = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def adapter_with_delta(overrides: tuple[str, ...], scale: float, grid: torch.dtype | None = None):
    """Tiny Llama + an adapter whose weights are random with std `scale`; `grid`: the base's weights rounded
    to that dtype first (a float32 model loaded from a checkpoint stored in it, as most are)."""
    cfg, problems = read_run_config(compose_config(["model=tiny-llama", *overrides]))
    assert problems == []
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters() if grid is not None else ():
            param.copy_(param.to(grid))
        adapter = build_adapter(model, cfg.adapter, cfg.rank)
        for param in adapter.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    examples = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (40, 33, 57, 21)]
    return adapter, tokenizer, probe_batch(examples, tokenizer.pad_token_id)


def adapter_with_large_delta(rank: int = 64, scale: float = 3.0):
    """Tiny Llama + MoRA sharing at a rank giving r̂ = hidden size (a full-rank M), M large: ΔW ~ the weights."""
    return adapter_with_delta(("adapter=mora", "adapter.mora_type=sharing", f"rank={rank}"), scale * 0.1)


def merge_wrong_on_one_layer(adapter, fraction: float) -> None:
    """Make the adapter's merge add (1 + fraction) x ΔW to its first layer: a merge off by `fraction` there."""
    deltas = adapter.delta_weights()
    name = min(deltas)
    real_merge = adapter.merge_and_unload

    def wrong_merge():
        merged = real_merge()
        layer = merged.get_submodule(name)
        with torch.no_grad():
            layer.weight += fraction * deltas[name].to(layer.weight.dtype)
        return merged

    adapter.merge_and_unload = wrong_merge


def test_a_large_correct_delta_passes_with_a_tolerance_above_the_fixed_one(tmp_path) -> None:
    adapter, tokenizer, probe = adapter_with_large_delta()
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged")
    assert result.passed, (result.max_abs_diff, result.tolerance)
    assert result.tolerance >= MERGE_TOLERANCE[torch.float32]
    print(f"large ΔW: max diff {result.max_abs_diff:.3g}, tolerance {result.tolerance:.3g}")


def test_a_wrong_delta_on_one_layer_fails(tmp_path) -> None:
    adapter, tokenizer, probe = adapter_with_large_delta()
    merge_wrong_on_one_layer(adapter, 0.01)  # ΔW off by 1 % on one layer
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged")
    assert not result.passed and result.max_abs_diff > result.tolerance
    assert f"x {FLOOR_FACTOR:g}" in result.failure_message(tmp_path / "adapter")


def test_the_tolerance_follows_the_measured_floor() -> None:
    logits = torch.ones(3, 5)
    # A model whose fp32 forward moves its logits by 4e-5 (SmolLM2 + MoRA sharing r=256, large M, as in the issue)
    # accepts its 4e-4 merge difference; a model with a tiny floor keeps the absolute 1e-4.
    assert merge_tolerance(torch.float32, 4e-5, logits) >= 4e-4
    assert merge_tolerance(torch.float32, 1e-9, logits) == MERGE_TOLERANCE[torch.float32]
    # No float64 reference (GPU, huge models): estimated from the logits' magnitude.
    assert merge_tolerance(torch.float32, 0.0, logits * 1e4) > MERGE_TOLERANCE[torch.float32]


# -- a checkpoint in a 16-bit dtype of a float32 model ---------------------------------------------------------


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_a_16_bit_checkpoint_of_a_correct_large_delta_passes_a_measured_tolerance(dtype, tmp_path) -> None:
    adapter, tokenizer, probe = adapter_with_large_delta()
    estimate = merge_tolerance(dtype, 0.0, logits_of(adapter.model, probe, torch.float64))  # the former tolerance
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged", dtype)
    assert result.passed, result.failure_message(tmp_path / "adapter")
    assert result.model.dtype == dtype and result.before_cast is not None
    # Before the cast the float32 check applies; after it, the cast's measured floor, below the estimate.
    assert result.before_cast.tolerance < result.tolerance < estimate
    print(
        f"{dtype}: before the cast {result.before_cast.max_abs_diff:.3g} <= {result.before_cast.tolerance:.3g}; "
        f"reloaded {result.max_abs_diff:.3g} <= {result.tolerance:.3g} (former estimate {estimate:.3g})"
    )


@pytest.mark.parametrize(
    "dtype,fraction",
    [
        pytest.param(torch.bfloat16, 0.01, id="bf16-1%"),
        pytest.param(torch.bfloat16, 0.1, id="bf16-10%"),
        pytest.param(torch.float16, 0.01, id="fp16-1%"),
    ],
)
def test_a_16_bit_checkpoint_of_a_delta_wrong_on_one_layer_fails(dtype, fraction, tmp_path) -> None:
    adapter, tokenizer, probe = adapter_with_large_delta()
    estimate = merge_tolerance(dtype, 0.0, logits_of(adapter.model, probe, torch.float64))
    merge_wrong_on_one_layer(adapter, fraction)
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged", dtype)
    assert not result.passed and not result.merge_passed
    assert result.before_cast.max_abs_diff > result.before_cast.tolerance
    # The reloaded checkpoint alone is within the cast's rounding of the trained model: the former tolerance,
    # which only looked at it, passed this merge.
    assert result.max_abs_diff <= estimate
    message = result.failure_message(tmp_path / "adapter")
    assert f"before its cast to {str(dtype).removeprefix('torch.')}" in message
    assert f"{result.before_cast.max_abs_diff:.3g}" in message


def test_a_16_bit_checkpoint_that_lost_the_delta_after_the_cast_fails(tmp_path, monkeypatch) -> None:
    """A merge right before the cast, but the checkpoint written holds the base weights without ΔW."""
    adapter, tokenizer, probe = adapter_with_large_delta()
    estimate = merge_tolerance(torch.bfloat16, 0.0, logits_of(adapter.model, probe, torch.float64))
    deltas = adapter.delta_weights()

    def save_without_delta(model, tokenizer, target):
        with torch.no_grad():
            for name, delta in deltas.items():
                model.get_submodule(name).weight -= delta.to(model.dtype)
        save_merged(model, tokenizer, target)

    monkeypatch.setattr("mora_train.export.merge.save_merged", save_without_delta)
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged", torch.bfloat16)
    assert result.before_cast.passed and not result.passed and result.max_abs_diff > result.tolerance
    assert result.max_abs_diff <= estimate  # which the former tolerance let pass
    assert "the rounding floor of bfloat16 weights" in result.failure_message(tmp_path / "adapter")


def test_the_cast_floor_is_measured_also_where_the_weights_already_lie_on_the_16_bit_grid(tmp_path) -> None:
    """Rounding such weights would not move them, but the merge moves them off the grid (W + ΔW) and the cast
    rounds them again: the floor must see that, or a correct merge would fail (small ΔW: none of the
    adapter's own rounding to stand in)."""
    adapter, tokenizer, probe = adapter_with_delta(("adapter=lora", "rank=8"), 0.002, grid=torch.bfloat16)
    reference = logits_of(adapter.model, probe, torch.float64)
    floor = export_rounding_floor(adapter.model, probe, reference, torch.bfloat16, torch.float64)
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged", torch.bfloat16)
    assert result.passed, result.failure_message(tmp_path / "adapter")
    assert 0.0 < result.max_abs_diff <= FLOOR_FACTOR * floor


def test_measuring_the_cast_floor_leaves_the_model_bit_for_bit(monkeypatch) -> None:
    adapter, _, probe = adapter_with_large_delta()
    before = {name: tensor.clone() for name, tensor in adapter.model.state_dict().items()}
    reference = logits_of(adapter.model, probe, torch.float64)
    assert export_rounding_floor(adapter.model, probe, reference, torch.bfloat16, torch.float64) > 0.0
    assert torch.equal(logits_of(adapter.model, probe, torch.float64), reference)

    norm = adapter.model.get_submodule("model.norm")  # a forward that raises after some layers were moved
    monkeypatch.setattr(norm, "forward", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        export_rounding_floor(adapter.model, probe, reference, torch.bfloat16, torch.float64)
    after = adapter.model.state_dict()
    assert all(torch.equal(after[name], kept) and after[name].dtype == kept.dtype for name, kept in before.items())


@pytest.mark.parametrize("fraction", [pytest.param(0.0, id="correct"), pytest.param(0.01, id="wrong-1%")])
def test_a_quantized_base_with_bfloat16_compute_is_checked_before_the_cast_too(fraction, tmp_path) -> None:
    """QMoRA's usual setting: merged/ in the bfloat16 compute dtype, while peft kept norms and embeddings in
    float32 — a checkpoint coarser than part of what the model computed in."""
    pytest.importorskip("bitsandbytes")
    from tests.support.quantized import probe_batch as quantized_probe
    from tests.support.quantized import trained_adapter

    bfloat16_compute = ("model.quantization_options.compute_dtype=bfloat16",)
    adapter, tokenizer = trained_adapter("nf4", "sharing", options=bfloat16_compute)
    probe = quantized_probe()
    if fraction:
        merge_wrong_on_one_layer(adapter, fraction)
    result = export_merged(adapter, tokenizer, probe, tmp_path / "merged")
    estimate = merge_tolerance(torch.bfloat16, 0.0, logits_of(result.model, probe, torch.float64))
    assert result.model.dtype == torch.bfloat16 and result.before_cast is not None
    assert result.kernel.passed and result.max_abs_diff <= result.tolerance < estimate
    assert result.passed == (fraction == 0.0), result.failure_message(tmp_path / "adapter")

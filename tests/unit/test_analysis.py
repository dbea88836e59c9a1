"""ΔW spectrum: LoRA's count is bounded by its rank, MoRA's is not; merged-vs-base and the cache agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mora_train.adapters import build_adapter
from mora_train.analysis.spectrum import (
    load_spectra,
    per_block_mean,
    save_spectra,
    singular_values,
    singular_values_of,
    summarize,
)
from mora_train.cli.spectrum import main as spectrum_main
from mora_train.core.errors import MoraTrainError
from mora_train.export import merged_deltas
from mora_train.models import load_model_and_tokenizer
from tests.conftest import typed_config

RANK = 2


def tiny_adapter(adapter: str, tmp_path: Path):
    """The tiny model with an adapter whose zero-initialised half is randomised (as training would)."""
    cfg = typed_config(["model=tiny-llama", f"adapter={adapter}", f"rank={RANK}"], tmp_path)
    model, _ = load_model_and_tokenizer(cfg.model)
    wrapped = build_adapter(model, cfg.adapter, cfg.rank)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in wrapped.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return wrapped


def test_lora_count_never_exceeds_rank_and_mora_goes_beyond(tmp_path: Path) -> None:
    lora = singular_values(tiny_adapter("lora", tmp_path).delta_weights())
    mora = singular_values(tiny_adapter("mora", tmp_path).delta_weights())
    assert len(lora) == len(mora) == 14
    for threshold in (1e-3, 1e-2, 0.1):
        assert all(s.count_above(threshold) <= RANK for s in lora)
    # Random B and A: LoRA's update has exactly rank r at a small threshold.
    assert all(s.count_above(1e-4) == RANK for s in lora)
    # MoRA's square matrix (r̂ = 14..20 here) gives a far higher-rank ΔW with the same budget.
    assert min(s.count_above(1e-3) for s in mora) > RANK
    assert summarize(mora, 1e-3)["mean"] > 4 * summarize(lora, 1e-3)["mean"]
    assert sorted(per_block_mean(mora, 0.0)) == [0, 1]


def test_merged_minus_base_recovers_the_adapter_update(tmp_path: Path) -> None:
    cfg = typed_config(["model=tiny-llama"], tmp_path)
    adapter = tiny_adapter("lora", tmp_path)
    direct = {
        name: s.singular_values
        for name, s in zip(adapter.delta_weights(), singular_values(adapter.delta_weights()), strict=True)
    }
    merged = adapter.merge_and_unload()
    base, _ = load_model_and_tokenizer(cfg.model)  # the tiny base is rebuilt identically from its init seed
    via_merge = singular_values(merged_deltas(base, merged))
    assert {s.name for s in via_merge} == set(direct)
    for s in via_merge:
        torch.testing.assert_close(s.singular_values[:RANK], direct[s.name][:RANK], atol=1e-5, rtol=1e-4)


def test_merged_equal_to_base_is_an_error(tmp_path: Path) -> None:
    cfg = typed_config(["model=tiny-llama"], tmp_path)
    base, _ = load_model_and_tokenizer(cfg.model)
    same, _ = load_model_and_tokenizer(cfg.model)
    with pytest.raises(MoraTrainError, match="nothing was trained"):
        merged_deltas(base, same)


def test_spectra_round_trip_through_the_cache(tmp_path: Path) -> None:
    spectra = singular_values(tiny_adapter("mora", tmp_path).delta_weights())
    save_spectra(spectra, tmp_path / "spectrum.safetensors", "adapter")
    loaded, source = load_spectra(tmp_path / "spectrum.safetensors")
    assert source == "adapter"
    assert [(s.name, s.d_out, s.d_in) for s in loaded] == sorted(
        [(s.name, s.d_out, s.d_in) for s in spectra], key=lambda t: (int(t[0].split(".")[2]), t[0])
    )
    by_name = {s.name: s for s in spectra}
    for s in loaded:
        assert torch.equal(s.singular_values, by_name[s.name].singular_values)


def test_spectrum_cli_on_an_adapter_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = tiny_adapter("mora", tmp_path)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    adapter.save(adapter_dir)
    out = tmp_path / "out"
    assert (
        spectrum_main([str(adapter_dir), "--base-model", "tiny-llama", "--threshold", "0.01", "--out", str(out)]) == 0
    )
    assert (out / "spectrum.png").stat().st_size > 0 and (out / "spectrum.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "14 layers" in printed
    assert spectrum_main([str(tmp_path / "missing")]) == 2


def test_singular_values_match_an_svd() -> None:
    generator = torch.Generator().manual_seed(1)
    for shape in ((40, 24), (24, 40), (32, 32)):
        matrix = torch.randn(shape, generator=generator) @ torch.diag(torch.logspace(0, -3, shape[1]))[: shape[1]]
        reference = torch.linalg.svdvals(matrix.double()).float()
        torch.testing.assert_close(singular_values_of(matrix), reference, atol=1e-6, rtol=1e-5)

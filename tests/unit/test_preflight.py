"""Problems that need the model (target names, ranks, disk) and the new config keys, each named with its fix."""

from __future__ import annotations

import errno
import importlib.util
from pathlib import Path

import pytest

from mora_train.adapters.base import match_target_linears
from mora_train.core.errors import ConfigError
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import RunConfig
from mora_train.training.preflight import PlannedRun, estimate_run_bytes, model_fit_problems
from mora_train.training.resilience import is_disk_full
from tests.conftest import compose_config, compose_run
from tests.conftest import validate_config as validate


def fit_arguments(run: RunConfig) -> PlannedRun:
    """The sections check_model_fit reads, as pipeline.train passes them."""
    return PlannedRun(run.model, run.trainer, run.adapter, run.rank, Path(run.output_dir), run.export.torch_dtype)


def fit_problems(tmp_path: Path, *overrides: str) -> list[str]:
    run = compose_run(["model=tiny-llama", *overrides], tmp_path / "run")
    model, _ = load_model_and_tokenizer(run.model)
    return model_fit_problems(model, fit_arguments(run))


def test_a_fitting_config_has_no_problems(tmp_path: Path) -> None:
    assert fit_problems(tmp_path, "adapter=mora") == []
    assert fit_problems(tmp_path, "adapter=full") == []


def test_unknown_target_modules_are_listed_with_the_models_layer_names(tmp_path: Path) -> None:
    (problem,) = fit_problems(tmp_path, "adapter=lora", "adapter.target_modules=[q_proj,qkv_proj,fc1]")
    assert "['qkv_proj', 'fc1'] match no linear layer" in problem
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in problem


def test_a_rank_too_large_for_a_layer_under_mora_truncation(tmp_path: Path) -> None:
    # k_proj/v_proj are 64 -> 32: truncation needs r_hat <= 32, and rank 16 gives r_hat = 39.
    problems = fit_problems(tmp_path, "adapter=mora", "adapter.mora_type=truncation", "rank=16")
    assert len(problems) == 2  # one per layer kind (k_proj, v_proj), not one per layer
    assert all("rank=16" in p and "truncation" in p and "lower the rank" in p for p in problems)
    assert "(and 1 more layers like it)" in problems[0]


def test_all_model_problems_come_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mora_train.training.preflight.free_bytes", lambda path: 10)
    problems = fit_problems(tmp_path, "adapter=lora", "adapter.target_modules=[nope]")
    assert len(problems) == 2 and "nope" in problems[0] and "not enough free disk" in problems[1]


def test_disk_estimate_counts_merged_model_adapter_and_checkpoints(tmp_path: Path) -> None:
    run = compose_run(
        ["model=tiny-llama", "adapter=lora", "rank=4", "trainer.max_steps=100", "trainer.save_steps=10"], tmp_path
    )
    model, _ = load_model_and_tokenizer(run.model)
    layers, _ = match_target_linears(model, list(run.adapter.target_modules))
    parts = estimate_run_bytes(model, layers, fit_arguments(run))
    params = sum(p.numel() for p in model.parameters())
    lora = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert parts["merged checkpoint"] == 4 * params
    assert parts["adapter"] == 4 * lora
    assert parts["training checkpoints"] == 3 * (3 * 4 * lora)  # save_total_limit 2, +1 while publishing


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.resume=/no/such/checkpoint", ["trainer.resume=/no/such/checkpoint", "trainer.resume=auto"]),
        ("trainer.nonfinite_loss=explode", ["trainer.nonfinite_loss=explode", "stop", "skip"]),
        ("trainer.save_total_limit=0", ["save_total_limit=0", "at least 1"]),
        ("trainer.resume=3", ["trainer.resume", "str or bool"]),
    ],
)
def test_new_trainer_keys_are_validated(override: str, expected: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["model=tiny-llama", override], tmp_path))
    (problem,) = info.value.problems
    for text in expected:
        assert text in problem


def test_gguf_model_without_the_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    cfg = compose_config(["model=tiny-llama", "model.random_init=null", f"model.name_or_path={gguf_file}"], tmp_path)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert any("gguf" in p and "pip install gguf" in p for p in info.value.problems)


def test_disk_full_is_recognised_from_the_errors_writers_raise(tmp_path: Path) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert is_disk_full(
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), tmp_path
    )
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)  # tmp_path has room
    assert not is_disk_full(ValueError("bad shape"), tmp_path)

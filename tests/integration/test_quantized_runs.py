"""QMoRA through the CLI on the tiny model: a nf4 run trains, merges (de-quantized) and passes the merge
check; a SIGKILL mid-run resumes to the same adapter weights; mode=eval re-attaches the adapter to a
freshly quantized base and scores what the run scored."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mora_train.training.checkpoints import complete_checkpoints
from tests.integration.test_resilience import assert_same_run, run_in_process, run_subprocess

pytest.importorskip("bitsandbytes")

NF4_MORA = ("adapter=mora", "model.quantization=nf4")


def test_nf4_mora_run_sigkill_resume_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reference = tmp_path / "reference"
    assert run_in_process(reference, *NF4_MORA) == 0
    out = capsys.readouterr().out
    assert "nf4 base, de-quantized in the merged checkpoint" in out
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["quantization"] == "nf4" and metrics["run"]["merge_check"] == "passed"
    assert metrics["merge_max_abs_diff"] <= metrics["merge_tolerance"] <= 1e-4
    # The kernel check passed against the saved adapter on a freshly loaded base (never assumed exactly 0).
    assert metrics["quantized_kernel_max_abs_diff"] <= metrics["quantized_kernel_tolerance"]
    merged_config = json.loads((reference / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    assert all(t.is_floating_point() for t in load_file(reference / "merged" / "model.safetensors").values())

    run_dir = tmp_path / "run"
    killed = run_subprocess(run_dir, "sigkill@step=4", *NF4_MORA)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert complete_checkpoints(run_dir / "checkpoints")
    assert run_in_process(run_dir, *NF4_MORA) == 0
    assert_same_run(run_dir, reference)

    # The run's adapter on a freshly quantized base (mode=eval) scores what the run's merged model scored.
    evaluated = tmp_path / "eval"
    assert run_in_process(evaluated, *NF4_MORA, "mode=eval", f"checkpoint={reference / 'adapter'}") == 0
    scored = json.loads((evaluated / "metrics.json").read_text())
    assert scored["char_accuracy"] == pytest.approx(metrics["char_accuracy"])


def test_a_wrong_dequantization_fails_the_run_loudly(tmp_path: Path, monkeypatch, capsys) -> None:
    """The run's reference is its saved adapter on a freshly loaded quantized base: a de-quantization that is
    off (here one row's scale by 5 % in every layer) fails the merge check, exit 5, naming both numbers."""
    from mora_train.models import quantization

    right = quantization.dequantized_weight

    def off_by_five_percent(module):
        weight = right(module).clone()
        weight[0] *= 1.05
        return weight

    monkeypatch.setattr(quantization, "dequantized_weight", off_by_five_percent)
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, *NF4_MORA, "trainer.max_steps=2", "trainer.save_steps=0") == 5
    err = capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["merge_check"] == "failed"
    assert metrics["quantized_kernel_max_abs_diff"] > metrics["quantized_kernel_tolerance"] > 0
    assert f"{metrics['quantized_kernel_max_abs_diff']:.3g}" in err and "freshly loaded quantized base" in err
    assert (run_dir / "merged-unverified").is_dir() and (run_dir / "adapter").is_dir()


@pytest.mark.parametrize(
    "overrides",
    [("adapter=lora", "model.quantization=int8"), ("adapter=mora", "model.quantization=nf4")],
    ids=["int8-lora", "nf4-mora"],
)
def test_a_bfloat16_base_passes_its_checks_against_the_rebuilt_adapter(tmp_path: Path, overrides) -> None:
    """A 16-bit base: training casts its norms and embeddings to float32 (peft's k-bit preparation), so the
    rebuilt reference must too, or the kernel check fails a correct run (int8 + bfloat16 exited 5 once)."""
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, *overrides, "model.dtype=bfloat16", "trainer.max_steps=4") == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["merge_check"] == "passed"
    assert metrics["quantized_kernel_max_abs_diff"] <= metrics["quantized_kernel_tolerance"]

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
    assert metrics["quantized_kernel_max_abs_diff"] == 0.0  # 4-bit on CPU: x @ dequantize(W), exactly
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

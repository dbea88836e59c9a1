"""Bad input fails fast: non-zero exit, one clear message, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

CASES = {
    "unknown adapter": (["adapter=dora"], ["dora", "lora", "mora", "full"]),
    "unknown task": (["task=chess"], ["chess", "uuid"]),
    "unknown model": (["model=gpt-17"], ["gpt-17", "tiny-llama"]),
    "rank zero": (["model=tiny-llama", "rank=0"], ["rank=0", "positive"]),
    "rank negative": (["model=tiny-llama", "rank=-4"], ["rank=-4"]),
    "missing model path": (["model=tiny-llama", "model.random_init=null", "model.name_or_path=./no/such/dir"], ["./no/such/dir", "does not exist"]),
    "unknown trainer key": (["model=tiny-llama", "trainer.max_stpes=3"], ["max_stpes"]),
}
if not torch.cuda.is_available():
    CASES["fp16 on cpu"] = (["model=tiny-llama", "trainer.precision=fp16"], ["fp16", "GPU"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_error(case: str, tmp_path: Path) -> None:
    args, expected = CASES[case]
    result = run_cli([*args, f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in result.stderr, f"{text!r} not in: {result.stderr}"
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_finished_run_dir_is_not_overwritten(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"char_accuracy": 1.0}')
    result = run_cli(["model=tiny-llama", f"output_dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "overwrite=true" in result.stderr
    assert (run_dir / "metrics.json").read_text() == '{"char_accuracy": 1.0}'

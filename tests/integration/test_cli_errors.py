"""Bad input fails fast: exit 2, one clear message, no traceback.

Config problems found by validation run the CLI's job function in-process; Hydra's own refusals are in
tests/unit/test_cli_config_errors.py. Two subprocesses check the real `python -m mora_train` process: its exit
code for a problem Hydra finds (before the job) and for one validation finds (inside the job).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mora_train.cli.train import _run
from tests.conftest import compose_config, run_cli

CASES = {
    "rank zero": (["rank=0"], ["rank=0", "positive"]),
    "rank negative": (["rank=-4"], ["rank=-4"]),
    "missing model path": (
        ["model.random_init=null", "model.name_or_path=./no/such/dir"],
        ["./no/such/dir", "does not exist"],
    ),
    "name_or_path beside random_init": (["model.name_or_path=./no/such/dir"], ["model.random_init=null", "both set"]),
}
if not torch.cuda.is_available():
    CASES["fp16 on cpu"] = (["trainer.precision=fp16"], ["fp16", "GPU"])


def run_in_process(run_dir: Path, *overrides: str) -> int:
    try:
        _run(compose_config(["model=tiny-llama", *overrides], run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_error(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args, expected = CASES[case]
    assert run_in_process(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert not (tmp_path / "run").exists()


def test_finished_run_dir_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"char_accuracy": 1.0}')
    assert run_in_process(run_dir) == 2 and "overwrite=true" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == '{"char_accuracy": 1.0}'


@pytest.mark.parametrize(
    "args,expected",
    [
        (["adapter=vera"], ["adapter=vera", "full, lora, mora"]),  # Hydra refuses it, before the job
        (["model=tiny-llama", "rank=0"], ["rank=0"]),  # validation refuses it, inside the job
    ],
)
def test_the_process_exits_2_without_a_traceback(args: list[str], expected: list[str], tmp_path: Path) -> None:
    result = run_cli([*args, f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in result.stderr, f"{text!r} not in: {result.stderr}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()

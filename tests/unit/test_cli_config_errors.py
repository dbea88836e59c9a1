"""What Hydra refuses on the command line, and output_dir= values no run can be written to: exit 2, one paragraph
naming the argument and the fix, no traceback, nothing created (docs/errors.md).

The CLI's main() runs in-process (Hydra composes and fails before any job starts): what the `mora-train` process
would print and exit with, at a fraction of a subprocess's cost.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import pytest

from mora_train.cli.train import main
from mora_train.config.overrides import parsed_value


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["mora-train", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    return stop.value.code, captured.err + captured.out


def one_clean_paragraph(output: str) -> str:
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("mora-train: error:")]
    return line


# -- Hydra's composition errors ----------------------------------------------------------------------------
CASES = {
    "unknown key": (["foo=1"], ["foo=1", "no key 'foo'", "+foo=1"]),
    "unknown adapter option": (
        ["adapter=mora2"],
        ["adapter=mora2", "full, lora, mora, mora_sharing", "did you mean adapter=mora?"],
    ),
    "unknown task option": (["task=gsm9k"], ["task=gsm9k", "gsm8k", "uuid", "did you mean task=gsm8k?"]),
    "unknown model option": (["model=gpt-17"], ["model=gpt-17", "tiny-llama", "--config-dir"]),
    "a key the chosen option lacks": (
        ["adapter=lora", "adapter.mora_type=rope"],
        ["adapter=lora has no key 'mora_type'", "adapter=mora", "+adapter.mora_type=rope"],
    ),
    "a misspelt key": (["trainer.max_stpes=3"], ["trainer.max_stpes=3", "Did you mean trainer.max_steps"]),
    "a key outside its section": (["learning_rate=1e-3"], ["Did you mean trainer.learning_rate?"]),
    "an override Hydra cannot parse": (
        ["trainer.learning_rate=[1,2"],
        ["cannot read", "'trainer.learning_rate=[1,2'", "quoted"],
    ),
    "a group outside the defaults list": (["sweep=lr"], ["sweep=lr", "+sweep=lr"]),
    "--cfg job with an unknown key": (["--cfg", "job", "foo=1"], ["foo=1", "+foo=1"]),
    "two commands at once": (["--cfg", "job", "--run"], ["Only one of"]),
    "a --config-dir that does not exist": (["--config-dir", "/no/such/configs"], ["/no/such/configs"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hydra_config_errors_exit_2_with_the_fix(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args, expected = CASES[case]
    code, output = run_main(monkeypatch, capsys, *args)
    assert code == 2, output
    line = one_clean_paragraph(output)
    for text in expected:
        assert text in line, f"{text!r} not in: {line}"
    assert not any(tmp_path.iterdir()), "a refused run leaves nothing behind"


def test_unquoted_spaces_in_a_path_get_the_quoted_argument_back(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    # What the shell hands over for: mora-train output_dir=/x/my run
    code, output = run_main(monkeypatch, capsys, f"output_dir={tmp_path}/my", "run")
    line = one_clean_paragraph(output)
    assert code == 2 and f"'run' looks like the rest of 'output_dir={tmp_path}/my'" in line
    (argument,) = shlex.split(line.split("Quote the whole argument: ", 1)[1])  # pasted into a shell: one argument
    assert parsed_value(argument) == f"{tmp_path}/my run"  # which Hydra reads as the whole path


def test_a_comma_outside_a_sweep_gets_the_hydra_quoted_value(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run_main(monkeypatch, capsys, f"output_dir={tmp_path}/a,b")
    line = one_clean_paragraph(output)
    assert code == 2 and "needs -m" in line
    quoted = re.search(r"quote it: (\S+);", line).group(1)
    (argument,) = shlex.split(quoted)
    assert parsed_value(argument) == f"{tmp_path}/a,b"


def test_a_sweep_with_a_bad_value_is_refused_before_any_job_and_leaves_no_folder(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "sweep"
    code, output = run_main(
        monkeypatch, capsys, "-m", "model=tiny-llama", "adapter=lora,mora2", f"hydra.sweep.dir={sweep_dir}"
    )
    line = one_clean_paragraph(output)
    assert code == 2 and "adapter=lora,mora2" in line and "full, lora, mora, mora_sharing" in line
    assert not sweep_dir.exists()


def test_hydra_full_error_from_the_user_keeps_hydras_traceback(tmp_path: Path, monkeypatch) -> None:
    from hydra.errors import HydraException

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["mora-train", "model=tiny-llama", "foo=1"])
    with pytest.raises(HydraException):
        main()
    assert os.environ["HYDRA_FULL_ERROR"] == "1" and "MORA_TRAIN_SET_HYDRA_FULL_ERROR" not in os.environ


def test_help_still_works_and_the_environment_is_left_as_found(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, output = run_main(monkeypatch, capsys, "--help")
    assert code == 0 and "adapter: dora, full, lora, mora, mora_sharing, olora, pissa, rslora" in output
    assert "HYDRA_FULL_ERROR" not in os.environ and "MORA_TRAIN_SET_HYDRA_FULL_ERROR" not in os.environ


# -- output_dir= that no run can be written to: refused before Hydra creates anything -----------------------
def _refuses_new_folders(folder: str) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError:
        return True
    return False


KERNEL_FS = "/sys" if Path("/sys").is_dir() and _refuses_new_folders("/sys") else None
needs_kernel_fs = pytest.mark.skipif(KERNEL_FS is None, reason="needs /sys refusing new folders (Linux)")


@pytest.mark.parametrize("value,expected", [("", "is empty"), ("'   '", "is empty"), ("null", "names no folder")])
def test_an_empty_output_dir_is_refused_and_nothing_is_written(
    value: str, expected: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    for sweep in ([], ["-m"]):
        code, output = run_main(monkeypatch, capsys, *sweep, "model=tiny-llama", f"output_dir={value}")
        line = one_clean_paragraph(output)
        assert code == 2 and expected in line and "leave output_dir out" in line
    assert not any(tmp_path.iterdir()), "nothing written into the current folder"


def test_a_dangling_symlink_as_output_dir_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(tmp_path / "nowhere")
    for target in ("runs", "runs/one"):
        code, output = run_main(monkeypatch, capsys, "model=tiny-llama", f"output_dir={tmp_path / target}")
        line = one_clean_paragraph(output)
        assert code == 2 and "symbolic link" in line and str(tmp_path / "nowhere") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@needs_kernel_fs
def test_an_output_dir_under_a_kernel_filesystem_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run_main(monkeypatch, capsys, "model=tiny-llama", f"output_dir={KERNEL_FS}/mora-run")
    line = one_clean_paragraph(output)
    assert code == 2 and f"output_dir={KERNEL_FS}/mora-run" in line and "no folder can be created" in line
    code, output = run_main(
        monkeypatch, capsys, "-m", "model=tiny-llama", "rank=2,4", f"hydra.sweep.dir={KERNEL_FS}/sweep"
    )
    assert code == 2 and "hydra.sweep.dir=" in one_clean_paragraph(output)


@needs_kernel_fs
def test_hydras_own_folder_creation_failing_is_a_user_error(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run dir only Hydra resolves (an interpolation the precheck leaves alone): Hydra's mkdir fails, exit 2."""
    monkeypatch.chdir(tmp_path)
    code, output = run_main(monkeypatch, capsys, "model=tiny-llama", f"hydra.run.dir={KERNEL_FS}/x/${{now:%H}}")
    line = one_clean_paragraph(output)
    assert code == 2 and "cannot create the run folder" in line and "output_dir=" in line

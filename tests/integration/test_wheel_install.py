"""The wheel, installed without -e into a fresh virtual environment, runs from any directory.

The new venv sees the repository venv's site-packages through a .pth line (torch, transformers, hydra...:
nothing is downloaded or reinstalled). A .pth *line* only adds a folder to sys.path; the .pth files inside
that folder (the repository's editable-install finder among them) are not run, so `mora_train` can only
come from the wheel. Offline: the wheel is built with --no-build-isolation and installed with --no-index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

TINY = [
    "model=tiny-llama",
    "trainer.max_steps=2",
    "task.num_pairs=2",
    "trainer.batch_size=2",
    "trainer.micro_batch_size=2",
]


def _run(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources, so that nothing (build/, egg-info) is written into the repository.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "mora_train", src / "mora_train", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            tmp / "dist",
            src,
        ],
        cwd=tmp,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = list((tmp / "dist").glob("mora_train-*.whl"))

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    )
    (site / "repo_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this (the repo's) venv
    installed = _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return env_dir


def test_the_installed_wheel_runs_outside_the_repository(wheel_venv: Path, tmp_path: Path) -> None:
    python, cli = wheel_venv / "bin" / "python", wheel_venv / "bin" / "mora-train"
    where = _run([python, "-c", "import mora_train, torch; print(mora_train.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    module = Path(where.stdout.strip()).resolve()
    assert module.is_relative_to(wheel_venv.resolve()) and not module.is_relative_to(REPO)

    # The configs are the wheel's package data: Hydra composes them (its record of the job shows the
    # defaults list's groups) and the job runs.
    run = tmp_path / "run"
    result = _run([cli, *TINY, f"output_dir={run}"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "uuid"
    composed = (run / ".hydra" / "config.yaml").read_text()
    assert "adapter:" in composed and "data_dir:" in composed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

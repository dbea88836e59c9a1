"""Shared fixtures: compose the real Hydra config (as the CLI does) with outputs under tmp_path."""

from __future__ import annotations

import os

# One thread for the whole suite (and the CLI subprocesses, which inherit it): tiny models gain nothing
# from more, and on a 2-core CI machine OpenMP threads of parallel processes only fight each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import mora_train  # noqa: E402,F401 - registers the resolvers the shipped configs use (${data_file:...})

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "mora_train" / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"
# The task configs read the Hugging Face Hub unless data_dir is set: the tests (and the CLI subprocesses,
# which inherit the environment) read the local copies in ../shared/data when that folder is there.
if SHARED_DATA.is_dir():
    os.environ.setdefault("MORA_TRAIN_DATA", str(SHARED_DATA))

# Small, fast and still learnable: used by every end-to-end test on the tiny model.
TINY_RUN = [
    "model=tiny-llama",
    "task.num_pairs=8",
    "trainer.max_steps=12",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=2",
    "trainer.lr_scheduler=constant",
]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed config the CLI would run, with output_dir pointed at a test folder."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir) if output_dir else "/nonexistent-output-dir"
    return cfg


@pytest.fixture
def tiny_config(tmp_path: Path):
    def make(*overrides: str) -> DictConfig:
        return compose_config([*TINY_RUN, *overrides], tmp_path / "run")

    return make


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m mora_train ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mora_train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )

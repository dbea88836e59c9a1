"""Shared fixtures: compose the real Hydra config (as the CLI does) with outputs under tmp_path."""

from __future__ import annotations

import functools
import os
import re

# One thread for the whole suite (and the CLI subprocesses, which inherit it): tiny models gain nothing
# from more, and on a 2-core CI machine OpenMP threads of parallel processes only fight each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import mora_train  # noqa: F401 - registers the resolvers the shipped configs use (${data_file:...})

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


def validate_config(cfg: DictConfig):
    """pipeline.validate on a composed config, as the CLI calls it: the RunConfig, or ConfigError."""
    from mora_train.pipeline.run_config import ComposedConfig
    from mora_train.pipeline.validate import validate

    return validate(ComposedConfig(cfg))


def typed_config(overrides: list[str], output_dir: Path | None = None):
    """The typed RunConfig of a composed config, its sections checked on their own (the cross-section checks of
    pipeline.validate are not run); fails the test when a section has a problem."""
    from mora_train.pipeline.run_config import read_run_config

    run, problems = read_run_config(compose_config(overrides, output_dir))
    assert problems == [], problems
    return run


def compose_run(overrides: list[str], output_dir: Path | None = None):
    """The typed RunConfig of a composed config (validated: ConfigError when it is not valid)."""
    return validate_config(compose_config(overrides, output_dir))


def run_pipeline(cfg: DictConfig) -> dict:
    """pipeline.train.run on a composed config, as the CLI calls it; returns the metrics."""
    from mora_train.pipeline.run_config import ComposedConfig
    from mora_train.pipeline.train import run

    return run(ComposedConfig(cfg))


def run_evaluation(cfg: DictConfig) -> dict:
    from mora_train.pipeline.evaluate import run_eval
    from mora_train.pipeline.run_config import ComposedConfig

    return run_eval(ComposedConfig(cfg))


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


# -- several xdist workers (pyproject: `-n 2 --dist loadscope --no-loadscope-reorder`) ---------------------------
# The work units handed to a worker, in collection order (the long integration modules first, the short unit
# tests filling the end):
# * a test module that defines a wider-than-function fixture (a trained run, a sweep, a built wheel): the whole
#   module, so that the fixture is set up once, as in a one-process run;
# * every module holding tests marked `multiprocess` (process groups of their own: DDP, FSDP2, DeepSpeed,
#   2-process launches): one unit, run one test after another by one worker, so that two of them never put four
#   busy processes on the 2-core CI machine while the other worker goes on with the rest;
# * any other test: alone, so that the two workers finish together.
# (Not --dist loadgroup with xdist_group marks: pytest 9.2's node ids no longer take the group suffix xdist 3.8
# adds, so the marks are silently ignored.)
MULTIPROCESS_UNIT = "modules with multiprocess tests"
WIDE_FIXTURE = re.compile(r"""scope\s*=\s*["'](class|module|package|session)["']""")


@pytest.hookimpl(tryfirst=True)  # before xdist turns -n into worker processes
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`pytest -m gpu` runs in one process unless -n is on the command line: its tests time and fill a device.

    (tests/gpu/conftest.py selects the GPU tests whenever the -m expression names gpu; so does this.)
    """
    explicit = any(arg.startswith(("-n", "--numprocesses")) for arg in config.invocation_params.args)
    if not explicit and hasattr(config.option, "numprocesses") and "gpu" in (config.option.markexpr or ""):
        config.option.numprocesses = 0


@functools.cache
def _module_unit(module: Path) -> str | None:
    """MULTIPROCESS_UNIT, the module's own path when its tests share a fixture, or None (each test alone).

    The controller schedules node ids before, and without, the workers' collected items and their marks: it
    reads the module's source (`pytest.mark.multiprocess` on a test or as its pytestmark both match)."""
    source = module.read_text(encoding="utf-8") if module.is_file() else ""
    if "mark.multiprocess" in source:
        return MULTIPROCESS_UNIT
    return str(module) if WIDE_FIXTURE.search(source) else None


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own choice; optional: `-p no:xdist` works
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureAndMultiprocessUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _module_unit(config.rootpath / nodeid.split("::", 1)[0]) or nodeid

    return SharedFixtureAndMultiprocessUnits(config, log)


@pytest.fixture(autouse=True)
def one_multiprocess_test_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """With another --dist than loadscope too, tests marked `multiprocess` take turns across xdist workers."""
    if request.node.get_closest_marker("multiprocess") is None or not hasattr(request.config, "workerinput"):
        yield
        return
    # Each worker's basetemp is <this run's basetemp>/popen-gwN: the lock is this run's, not other runs'.
    with FileLock(tmp_path_factory.getbasetemp().parent / "multiprocess-tests.lock"):
        yield

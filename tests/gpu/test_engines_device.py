"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP, each in one process, against the plain run: same losses, same merged weights.

Each engine runs the same MoRA job (tiny-llama, 6 optimizer steps, fp32, a loss logged every step) launched
as a user would, with docs/distributed.md's one-GPU command `scripts/launch.sh --gpus 1 distributed=...` (accelerate's
one-process launcher; on CPU, in the device check's dry run, the same command trains on CPU). ZeRO-3 partitions
even the tiny model's small weights (stage3_param_persistence_threshold=0). The plain run is the same job in this
process (distributed=none).

Tolerances (the engines differ only in reduction order and in where clipping and AdamW run):
* logged losses (≈ 5): max |engine - plain| ≤ 2e-3;
* merged weights: max |engine - plain| over every tensor of merged/model.safetensors ≤ 1e-4 on CPU,
  1e-3 on CUDA (cuBLAS sums in another order, and AdamW's first steps are ≈ lr · sign(g), so the last bits of
  a tiny gradient can move a weight by up to lr · |Δg| / (|g| + eps)); the update itself is ≈ 5e-2.
FSDP needs CUDA (the product refuses it on CPU): skipped on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_RUN, compose_config
from tests.conftest import run_pipeline as run
from tests.gpu.conftest import ON_CUDA, record

pytestmark = pytest.mark.gpu

JOB = [*TINY_RUN, "trainer.max_steps=6", "trainer.logging_steps=1", "task.eval.max_samples=2", "adapter=mora", "rank=4"]
ZERO3_ALL = "+distributed.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"
LOSS_ATOL = 2e-3
WEIGHT_ATOL = 1e-3 if ON_CUDA else 1e-4
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def plain(device: torch.device, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    metrics = run(compose_config([*JOB, "distributed=none"], run_dir))
    assert metrics["run"]["merge_check"] == "passed"
    return run_dir


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = ["bash", str(REPO / "scripts" / "launch.sh"), "--gpus", "1", *args]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_engine_matches_plain_run(engine: str, device: torch.device, plain: Path, tmp_path: Path) -> None:
    if engine.startswith("zero") and not HAS_DEEPSPEED:
        pytest.fail("DeepSpeed is not installed (scripts/device_check.sh installs it from device_wheels/)")
    if engine == "fsdp" and not ON_CUDA:
        pytest.skip("FSDP runs on CUDA only (the product refuses it on CPU)")
    run_dir = tmp_path / engine
    args = [*JOB, f"distributed={engine}", f"output_dir={run_dir}", *([ZERO3_ALL] if engine == "zero3" else [])]
    started = time.time()
    result = launch(args, tmp_path)
    wall = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected_engine = {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3", "fsdp": "fsdp"}[engine]
    got, ref = losses(run_dir), losses(plain)
    loss_diff = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    engine_w, plain_w = (
        load_file(run_dir / "merged" / "model.safetensors"),
        load_file(plain / "merged" / "model.safetensors"),
    )
    assert engine_w.keys() == plain_w.keys()
    weight_diff = max((engine_w[k].float() - plain_w[k].float()).abs().max().item() for k in plain_w)
    record(
        "engine",
        engine=metrics["run"]["engine"],
        world_size=metrics["run"]["world_size"],
        losses=got,
        plain_losses=ref,
        max_loss_diff=loss_diff,
        loss_tolerance=LOSS_ATOL,
        max_merged_weight_diff=weight_diff,
        weight_tolerance=WEIGHT_ATOL,
        merge_check=metrics["run"]["merge_check"],
        tokens_per_s=metrics["tokens_per_s"],
        peak_gpu_memory_gib=metrics["run"].get("peak_gpu_memory_gib"),
        wall_s=wall,
    )
    assert metrics["run"]["engine"].startswith(expected_engine) and metrics["run"]["world_size"] == 1, metrics["run"]
    assert metrics["run"]["merge_check"] == "passed"
    assert len(got) == len(ref) == 6 and loss_diff <= LOSS_ATOL, (got, ref)
    assert weight_diff <= WEIGHT_ATOL, f"{engine}: merged weights differ from the plain run's by {weight_diff:.2e}"

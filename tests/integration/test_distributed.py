"""Two-process CPU runs (gloo): data-parallel training matches one process and writes its outputs once.

Each adapter is launched a different documented way: `accelerate launch -m mora_train`,
`scripts/launch.sh --cpu 2`, and the `mora-train` console script under `accelerate launch`.
(`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up; its
torchrun-based multi-process launcher runs on CPU too, which is what these use.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_RUN, compose_config
from tests.conftest import run_pipeline as run
from tests.support.faults import fault_env

# Each test starts two training processes: one such test at a time (tests/conftest.py).
pytestmark = pytest.mark.multiprocess

# Small: 6 optimizer steps of a global batch of 8 (2 ranks x 1 micro-batch of 4, or 1 process x 2 accumulated).
RUN = [*TINY_RUN, "trainer.max_steps=6", "trainer.logging_steps=1", "task.eval.max_samples=2"]
ADAPTER_ARGS = {
    "lora": ["adapter=lora", "rank=4"],
    "mora": ["adapter=mora", "rank=4"],
    "full": ["adapter=full", "trainer.learning_rate=3e-3"],
}
ACCELERATE_2_CPU = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]
CONSOLE_SCRIPT = Path(sys.executable).parent / "mora-train"
LOSS_TOLERANCE = 1e-3  # logged losses are ~5; reduction order is the only difference between the runs
WEIGHT_TOLERANCE = 1e-4


def launch(how: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    commands = {
        "accelerate": [*ACCELERATE_2_CPU, "-m", "mora_train"],
        "launch.sh": ["bash", str(REPO / "scripts" / "launch.sh"), "--cpu", "2"],
        "console script": [*ACCELERATE_2_CPU, str(CONSOLE_SCRIPT)],
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}
    return subprocess.run([*commands[how], *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def logged_losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def trained_weights(run_dir: Path, variant: str) -> dict[str, torch.Tensor]:
    folder = "merged" if variant == "full" else "adapter"
    name = "model.safetensors" if variant == "full" else "adapter_model.safetensors"
    return load_file(run_dir / folder / name)


def assert_same_training(dist_dir: Path, single_dir: Path, variant: str) -> None:
    dist_losses, single_losses = logged_losses(dist_dir), logged_losses(single_dir)
    assert len(dist_losses) == len(single_losses) == 6
    loss_diff = max(abs(a - b) for a, b in zip(dist_losses, single_losses, strict=True))
    assert loss_diff <= LOSS_TOLERANCE, (dist_losses, single_losses)
    assert dist_losses[-1] < dist_losses[0], "the loss did not fall"
    dist_weights, single_weights = trained_weights(dist_dir, variant), trained_weights(single_dir, variant)
    assert dist_weights.keys() == single_weights.keys()
    for key, tensor in dist_weights.items():
        assert tensor.shape == single_weights[key].shape and tensor.numel() > 0, key
        assert (tensor.float() - single_weights[key].float()).abs().max().item() <= WEIGHT_TOLERANCE, key


HOW = {"lora": "accelerate", "mora": "launch.sh", "full": "console script"}


@pytest.mark.parametrize("variant", sorted(ADAPTER_ARGS))
def test_two_process_run_matches_one_process_and_writes_once(variant: str, tmp_path: Path) -> None:
    how = HOW[variant]
    if how == "console script" and not CONSOLE_SCRIPT.exists():
        how = "accelerate"  # mora-train not installed as a script in this environment
    args = [*RUN, *ADAPTER_ARGS[variant]]
    # No output_dir: both ranks must resolve Hydra's dated run dir to the same folder.
    result = launch(how, args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, f"ranks disagreed on the run dir: {run_dirs}"
    run_dir = run_dirs[0]
    expected = {
        ".hydra",
        "train.log",
        "resolved_config.yaml",
        "merged",
        "metrics.json",
        "predictions.jsonl",
        "loss.png",
        "log_history.json",
        "tensorboard",
        "checksums.json",
        "card_facts.json",
    }
    expected |= {"adapter"} if variant != "full" else set()
    found = {p.name for p in run_dir.iterdir()} - {"checkpoints"}  # (an empty checkpoints/ may exist)
    assert found == expected  # no half-written or per-rank leftovers
    assert result.stdout.count("merged model:") == 1 and result.stdout.count("trainable:") == 1
    assert (run_dir / "train.log").read_text().count("reproduces the adapted logits") == 1  # rank 1 never logs there

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["engine"] == "ddp" and metrics["run"]["world_size"] == 2
    checksums = metrics["run"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "ranks ended with different weights"
    assert metrics["merge_max_abs_diff"] <= 1e-4

    single_dir = tmp_path / "single"
    single = run(compose_config(args, single_dir))
    assert single["run"]["world_size"] == 1 and single["run"]["replica_checksums"] is None
    assert_same_training(run_dir, single_dir, variant)


def test_fsdp2_shards_train_and_gather_exactly_on_cpu(tmp_path: Path) -> None:
    """FSDP2 (PyTorch fully_shard, gloo): gradients, gathered weights and rebuilt exports match unsharded."""
    worker = Path(__file__).with_name("fsdp2_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    assert sorted(results) == ["full", "lora", "mora"]
    for variant, r in results.items():
        assert r["local_shape"] != r["full_shape"], f"{variant}: nothing was sharded"
        assert r["grad_diff"] <= 1e-6 and r["weight_diff"] == 0.0 and r["logit_diff"] <= 1e-6, (variant, r)


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
DEEPSPEED_CASES = [
    pytest.param("zero3", "mora", id="zero3-mora"),
    pytest.param("zero3", "full", id="zero3-full", marks=pytest.mark.slow),
    pytest.param("zero2", "lora", id="zero2-lora", marks=pytest.mark.slow),
]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is an optional extra (pip install 'mora-train[deepspeed]')")
@pytest.mark.parametrize("option,variant", DEEPSPEED_CASES)
def test_deepspeed_two_process_run_exports_gathered_weights(option: str, variant: str, tmp_path: Path) -> None:
    """DeepSpeed runs on CPU (gloo) too: ZeRO-3 partitions every weight ([0]-shaped on each rank)."""
    run_dir = tmp_path / "run"
    args = [*RUN, *ADAPTER_ARGS[variant], f"distributed={option}", "trainer.save_steps=3"]
    # Partition even the tiny model's small weights (by default ZeRO-3 keeps those below ~10 x hidden whole).
    zero3_all = ["+distributed.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0"]
    result = launch("accelerate", [*args, *(zero3_all if option == "zero3" else []), f"output_dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["engine"] == f"deepspeed-{option}" and metrics["run"]["world_size"] == 2
    assert metrics["merge_max_abs_diff"] <= 1e-4
    if variant != "full":  # mid-run checkpoints hold the gathered adapter too
        checkpoint = load_file(run_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")
        final = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert checkpoint.keys() == final.keys()
        assert all(checkpoint[k].shape == final[k].shape and final[k].numel() > 0 for k in final)

    single_dir = tmp_path / "single"
    run(compose_config([*RUN, *ADAPTER_ARGS[variant], "trainer.save_steps=3"], single_dir))
    assert_same_training(run_dir, single_dir, variant)


@pytest.mark.slow
@pytest.mark.parametrize("option,variant", [("none", "lora"), ("zero3", "mora")])
def test_two_process_run_killed_mid_training_resumes_to_the_same_weights(
    option: str, variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank is SIGKILLed as step 5 begins; the same command resumes from checkpoint-3 (rank 0 picks it)."""
    if option.startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is an optional extra (pip install 'mora-train[deepspeed]')")
    args = [*RUN, *ADAPTER_ARGS[variant], f"distributed={option}", "trainer.save_steps=3"]
    if option == "zero3":
        args.append("+distributed.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
    whole = launch("accelerate", [*args, f"output_dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    resumed_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        for key, value in fault_env("sigkill@step=5").items():  # tests/support/faults.py: each rank kills itself
            patch.setenv(key, value)
        killed = launch("accelerate", [*args, f"output_dir={resumed_dir}"], tmp_path)
    assert killed.returncode != 0 and not (resumed_dir / "metrics.json").exists()
    resumed = launch("accelerate", [*args, f"output_dir={resumed_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1 and "checkpoint-3" in resumed.stdout
    assert json.loads((resumed_dir / "metrics.json").read_text())["run"]["resumed_from_step"] == 3
    whole_weights, resumed_weights = trained_weights(tmp_path / "whole", variant), trained_weights(resumed_dir, variant)
    assert all(torch.equal(whole_weights[k], resumed_weights[k]) for k in whole_weights)

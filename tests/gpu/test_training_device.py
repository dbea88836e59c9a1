"""Short training runs on the device, one per adapter, through the real pipeline (`mora_train.pipeline.train.run`).

Each run: the loss falls, the merge check passes (the merged checkpoint, reloaded, reproduces the adapted
model's logits within the pipeline's own tolerance), and the merged folder reloads with plain transformers
on the device with finite logits that match the same checkpoint on CPU in float32 (1e-4 absolute).
On CUDA the run must have used the GPU (metrics.json's run.peak_gpu_memory_gib > 0).

bf16 + gradient checkpointing: MoRA with trainer.precision=bf16 (autocast) and
trainer.gradient_checkpointing=true; its first logged loss (the untrained model's, before any update)
is within 2e-2 relative of the fp32 run's, then the same checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN, compose_config
from tests.conftest import run_pipeline as run
from tests.gpu.conftest import ON_CUDA, record

pytestmark = pytest.mark.gpu

JOB = [*TINY_RUN, "trainer.max_steps=12", "trainer.logging_steps=2", "task.eval.max_samples=2"]
ADAPTERS = {
    "lora": ["adapter=lora", "rank=4"],
    "mora_rope": ["adapter=mora", "adapter.mora_type=rope", "rank=4"],
    "mora_sharing": ["adapter=mora", "adapter.mora_type=sharing", "rank=4"],
    "full": ["adapter=full", "trainer.learning_rate=3e-3"],
}
BF16_GC = ["trainer.precision=bf16", "trainer.gradient_checkpointing=true"]
FIRST_LOSS_BF16_RTOL = 2e-2
RELOAD_ATOL = 1e-4


def losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


@torch.no_grad()
def reload_and_compare(merged: Path, device: torch.device) -> float:
    """Reload merged/ on the device and on CPU (float32); max |logits difference|."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 35).reshape(2, 16)
    on_device = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()
    on_cpu = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    a = on_device(input_ids=ids.to(device)).logits.cpu()
    b = on_cpu(input_ids=ids).logits
    assert torch.isfinite(a).all(), "merged model gives non-finite logits on the device"
    return (a - b).abs().max().item()


def check_run(metrics: dict, run_dir: Path, device: torch.device, name: str) -> dict:
    logged = losses(run_dir)
    peak = metrics["run"].get("peak_gpu_memory_gib")
    reload_diff = reload_and_compare(run_dir / "merged", device)
    result = {
        "run": name,
        "first_loss": logged[0],
        "last_loss": logged[-1],
        "merge_max_abs_diff": metrics["merge_max_abs_diff"],
        "merge_tolerance": metrics["merge_tolerance"],
        "merge_check": metrics["run"]["merge_check"],
        "reload_device_vs_cpu": reload_diff,
        "peak_gpu_memory_gib": peak,
        "tokens_per_s": metrics["tokens_per_s"],
    }
    record("training", **result)
    assert all(math.isfinite(v) for v in logged), f"non-finite loss: {logged}"
    assert logged[-1] < logged[0], f"{name}: the loss did not fall: {logged}"
    assert metrics["run"]["merge_check"] == "passed" and metrics["merge_max_abs_diff"] <= metrics["merge_tolerance"]
    assert reload_diff <= RELOAD_ATOL, f"{name}: merged model on {device} vs CPU: {reload_diff:.2e}"
    if ON_CUDA:
        assert peak is not None and peak > 0, f"{name}: the run did not use the GPU (peak_gpu_memory_gib={peak})"
    return result


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_short_training_run_per_adapter(adapter: str, device: torch.device, tmp_path: Path) -> None:
    run_dir = tmp_path / adapter
    metrics = run(compose_config([*JOB, *ADAPTERS[adapter]], run_dir))
    check_run(metrics, run_dir, device, adapter)


def test_bf16_with_gradient_checkpointing(device: torch.device, tmp_path: Path) -> None:
    fp32 = run(compose_config([*JOB, *ADAPTERS["mora_rope"]], tmp_path / "fp32"))
    bf16 = run(compose_config([*JOB, *ADAPTERS["mora_rope"], *BF16_GC], tmp_path / "bf16"))
    assert fp32["run"]["merge_check"] == "passed"
    result = check_run(bf16, tmp_path / "bf16", device, "mora_rope bf16+gc")
    first_fp32 = losses(tmp_path / "fp32")[0]
    rel = abs(result["first_loss"] - first_fp32) / abs(first_fp32)
    record("training", run="mora_rope bf16+gc vs fp32", first_loss_rel_diff=rel, tolerance=FIRST_LOSS_BF16_RTOL)
    assert rel <= FIRST_LOSS_BF16_RTOL, f"bf16 first loss {result['first_loss']} vs fp32 {first_fp32}"

"""QMoRA's merge check on the device: a short nf4 MoRA and int8 LoRA run through the real pipeline.

Both checks of a quantized run must pass (docs/adapters.md): the de-quantized base against the saved adapter on a
freshly loaded quantized base (`quantized_kernel_max_abs_diff` <= `quantized_kernel_tolerance`), and the reloaded
merged checkpoint. On a GPU, LLM.int8 trains with int8 activations, so the int8 kernel check uses a relative
tolerance reasoned from bitsandbytes' CPU emulation of it (models/quantization.py), not yet measured on a GPU:
the recorded ratio (difference / tolerance) is that measurement.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN, compose_config
from tests.conftest import run_pipeline as run
from tests.gpu.conftest import record

pytestmark = pytest.mark.gpu
pytest.importorskip("bitsandbytes")

JOB = [*TINY_RUN, "trainer.max_steps=6", "trainer.logging_steps=2", "task.eval.max_samples=2"]
RUNS = {
    "nf4 mora_rope": ["adapter=mora", "adapter.mora_type=rope", "rank=4", "model.quantization=nf4"],
    "int8 lora": ["adapter=lora", "rank=4", "model.quantization=int8"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_quantized_run_passes_both_merge_checks(name: str, device: torch.device, tmp_path: Path) -> None:
    metrics = run(compose_config([*JOB, *RUNS[name]], tmp_path / "run"))
    kernel, kernel_tol = metrics["quantized_kernel_max_abs_diff"], metrics["quantized_kernel_tolerance"]
    record(
        "quantized_merge",
        run=name,
        kernel_diff=kernel,
        kernel_tolerance=kernel_tol,
        kernel_ratio=kernel / kernel_tol if kernel_tol else None,
        merge_max_abs_diff=metrics["merge_max_abs_diff"],
        merge_tolerance=metrics["merge_tolerance"],
        merge_check=metrics["run"]["merge_check"],
    )
    assert metrics["run"]["merge_check"] == "passed", f"{name}: {metrics['run']['merge_check']}"
    assert kernel <= kernel_tol and metrics["merge_max_abs_diff"] <= metrics["merge_tolerance"]

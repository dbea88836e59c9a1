"""GPU tests (`pytest -m gpu`): run on CUDA; skipped without it, and left out of the default run.

`MORA_TRAIN_TEST_DEVICE=cpu pytest -m gpu tests/gpu` runs the same tests on CPU with tiny sizes: that is what
`scripts/device_check.sh --dry-run` does, so the tests are known to work before a GPU is ever lent. Tests
that only mean something on CUDA (FSDP: the product refuses it without CUDA GPUs) skip there, saying so.

`MORA_TRAIN_DEVICE_RESULTS=FILE`: tests append what they measured (one JSON object per line) to FILE, which
scripts/device_check.sh turns into its results table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
FORCED = os.environ.get("MORA_TRAIN_TEST_DEVICE", "").strip().lower()
if FORCED not in ("", "cpu", "cuda"):
    raise pytest.UsageError(f"MORA_TRAIN_TEST_DEVICE must be cpu or cuda, got {FORCED!r}")
DEVICE = FORCED or ("cuda" if torch.cuda.is_available() else "")
ON_CUDA = DEVICE == "cuda"
NO_DEVICE = "needs a CUDA GPU (MORA_TRAIN_TEST_DEVICE=cpu runs these tests on CPU with tiny sizes)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test here `gpu`; leave them out unless the -m expression names gpu (as `-m gpu` does)."""
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    for item in ours:
        item.add_marker(pytest.mark.gpu)
    if "gpu" not in (config.option.markexpr or ""):
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]


@pytest.fixture(scope="session")
def device() -> torch.device:
    if not DEVICE:
        pytest.skip(NO_DEVICE)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("MORA_TRAIN_TEST_DEVICE=cuda, but torch sees no CUDA device")
    if DEVICE == "cuda":
        # fp32 means fp32: no TF32 matmuls behind the tolerances' back.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(DEVICE)


def record(kind: str, **fields) -> None:
    """Append one measurement to MORA_TRAIN_DEVICE_RESULTS (when set) for the device check's table."""
    path = os.environ.get("MORA_TRAIN_DEVICE_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "device": DEVICE, **fields}, default=str) + "\n")

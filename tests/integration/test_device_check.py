"""scripts/device_check.sh --dry-run: the GPU check runs end to end on CPU with tiny sizes (~1.5 min).

So the check is known to work before a GPU is lent: every step that can run on CPU passes (the GPU tests run
on CPU through MORA_TRAIN_TEST_DEVICE=cpu, the throughput script on tiny-llama), the CUDA-only parts are
skipped and say so, and the results folder holds the markdown table and the raw JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "device_check.sh"


@pytest.mark.multiprocess  # its GPU tests include 2-process ZeRO-3 runs
def test_dry_run_passes_every_cpu_step_and_writes_table_and_json(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(results)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert sorted(p.name for p in results.iterdir()) == ["check.log", "gpu-tests.xml", "results.json", "results.md"]

    record = json.loads((results / "results.json").read_text())
    assert record["dry_run"] is True
    status = {s["step"]: s["status"] for s in record["steps"]}
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    assert status == {
        "environment": "passed",
        "install": "skipped",
        "gpu-tests": "passed",
        "throughput": "passed",
        "quantized": "passed" if has_bitsandbytes else "skipped",
    }, record["steps"]
    outcomes = {t["test"]: t["outcome"] for t in record["tests"]}
    assert "failed" not in outcomes.values() and "error" not in outcomes.values()
    assert outcomes["test_engines_device::test_engine_matches_plain_run[fsdp]"] == "skipped"  # CUDA only
    assert outcomes["test_engines_device::test_engine_matches_plain_run[zero3]"] == "passed"
    assert sum(o == "passed" for o in outcomes.values()) >= 60
    kinds = {m["kind"] for m in record["measurements"]}
    expected = {"mora_layer", "training", "engine", "packing"}
    assert kinds == expected | ({"quantized_merge"} if has_bitsandbytes else set())
    methods = [(row["method"], row["rank"]) for row in record["throughput"]["rows"]]
    assert len(methods) == 6 and all("error" not in row for row in record["throughput"]["rows"])

    table = (results / "results.md").read_text()
    for heading in (
        "| step | status |",
        "## GPU tests",
        "## MoRA layers",
        "## Training runs",
        "## Engines",
        "## Throughput",
    ):
        assert heading in table, heading
    assert "| deepspeed-zero3 |" in table and "MFU" in table
    if has_bitsandbytes:
        assert "## QMoRA: nf4 base vs bf16 base" in table and "| mora rope r=4, nf4 base |" in table
        assert "## Quantized runs: kernel check and merge check" in table and "| int8 lora |" in table
    assert "device_check: done" in (results / "check.log").read_text()


def test_usage_errors_and_gpu_tests_left_out_of_the_default_run(tmp_path: Path) -> None:
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    # Without `-m gpu` the GPU tests are deselected (not skipped), even when their folder is named. In one
    # process (-n 0): xdist workers deselect silently, and starting them costs more than the check.
    default = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-n", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert default.returncode == 5, default.stdout[-2000:]  # 5: no test ran
    assert "deselected" in default.stdout and "passed" not in default.stdout

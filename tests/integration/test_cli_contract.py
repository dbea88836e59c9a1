"""`mora-train --help`, `--cfg job` and `-m` behave as Hydra users expect."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TINY_RUN, run_cli


def test_help_lists_groups_and_examples(tmp_path: Path) -> None:
    result = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    assert "adapter: dora, full, lora, mora, mora_sharing, olora, pissa, rslora" in result.stdout
    assert "tiny-llama" in result.stdout and "smollm2-135m" in result.stdout
    assert "mora-train adapter=lora rank=16" in result.stdout


def test_cfg_job_prints_config_and_runs_nothing(tmp_path: Path) -> None:
    result = run_cli(
        ["--cfg", "job", "adapter=lora", "rank=16", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0
    assert "rank: 16" in result.stdout and "name: lora" in result.stdout
    assert not (tmp_path / "run").exists()


def test_multirun_gives_each_job_its_own_run_dir(tmp_path: Path) -> None:
    args = ["-m", *TINY_RUN, "trainer.max_steps=2", "adapter=lora,mora", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = run_cli([a for a in args if not a.startswith("output_dir")], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(metrics) == 2
    assert sorted(json.loads(m.read_text())["adapter"] for m in metrics) == ["lora", "mora"]
    # Jobs without quantization or DeepSpeed print nothing from those packages (which transformers, peft and
    # accelerate import whenever they are installed): not bitsandbytes' kernel-download notice, which talks of
    # trust_remote_code (on CPUs with AVX512-BF16), nor DeepSpeed's "Setting accelerator to CPU" (on stdout).
    for notice in ("gemm_4bit_forward", "trust_remote_code=True", "Setting accelerator to CPU"):
        assert notice not in result.stdout + result.stderr, notice

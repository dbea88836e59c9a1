"""Hydra multiruns on the tiny model end in a report: one row per job, plots, failed jobs listed, ΔW spectra."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mora_train.analysis.report import build_report
from mora_train.analysis.spectrum import load_spectra
from tests.conftest import run_cli
from tests.support.faults import fault_env

# Few steps at a high constant learning rate: enough for ΔW to grow well past the 0.1 threshold.
SWEEP_RUN = [
    "model=tiny-llama",
    "task.num_pairs=8",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=8",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.lr_scheduler=constant",
    "task.eval.max_samples=4",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rank_sweep(tmp_path_factory: pytest.TempPathFactory):
    """`+sweep=rank_ablation` narrowed to ranks 2 and 4: lora/mora x 2 ranks = 4 jobs, then the report."""
    root = tmp_path_factory.mktemp("rank_sweep")
    sweep_dir = root / "sweep"
    result = run_cli(["-m", "+sweep=rank_ablation", *SWEEP_RUN, "rank=2,4", f"hydra.sweep.dir={sweep_dir}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = build_report(sweep_dir)
    return sweep_dir, report, result


def test_four_job_sweep_gives_four_row_report_with_plots(rank_sweep) -> None:
    sweep_dir, _report, result = rank_sweep
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 4 and [j.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]
    assert "4 of 4 jobs succeeded" in result.stdout

    rows = read_csv(sweep_dir / "report.csv")
    assert len(rows) == 4
    assert sorted((r["adapter"], r["rank"]) for r in rows) == [
        ("lora", "2"),
        ("lora", "4"),
        ("mora", "2"),
        ("mora", "4"),
    ]
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        assert row["primary_metric"] == "char_accuracy" and 0.0 <= float(row["primary_value"]) <= 1.0
        assert float(row["final_train_loss"]) > 0 and float(row["wall_time_s"]) > 0 and float(row["tokens_per_s"]) > 0
        assert int(row["trainable_params"]) > 0
        assert "exact_match=" in row["secondary_metrics"]
        if row["adapter"] == "mora":
            assert row["mora_type"] == "rope" and "-" in row["r_hat_range"]  # r̂ differs across layer shapes
    # Equal budgets: MoRA's parameter count is within a few percent of LoRA's at each rank.
    params = {(r["adapter"], r["rank"]): int(r["trainable_params"]) for r in rows}
    for rank in ("2", "4"):
        assert abs(params[("mora", rank)] - params[("lora", rank)]) / params[("lora", rank)] < 0.05

    for name in ("loss_curves.png", "metric_vs_rank.png", "spectrum.png"):
        data = (sweep_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    markdown = (sweep_dir / "report.md").read_text()
    assert markdown.count("| [#") == 4  # four table rows, each linking its run folder
    for name in ("loss_curves.png", "metric_vs_rank.png", "spectrum.png"):
        assert f"]({name})" in markdown
    assert "Failed runs" not in markdown


def test_spectrum_mora_has_higher_rank_update_than_lora(rank_sweep) -> None:
    _sweep_dir, report, _ = rank_sweep
    threshold = 0.1
    mean_counts = {}
    for run in report.runs:
        spectra, source = load_spectra(run.path / "spectrum.safetensors")  # cached by the report
        assert source == "adapter" and len(spectra) == 14  # 7 projections x 2 blocks
        counts = [s.count_above(threshold) for s in spectra]
        if run.adapter == "lora":
            assert max(counts) <= run.rank, f"LoRA r={run.rank} ΔW has more than r singular values > {threshold}"
            # ...and at any threshold: its numerical rank (relative to the largest singular value) is at most r.
            assert all(s.count_above(1e-4 * float(s.singular_values[0])) <= run.rank for s in spectra)
        mean_counts[(run.adapter, run.rank)] = sum(counts) / len(counts)
    for rank in (2, 4):
        assert mean_counts[("mora", rank)] > mean_counts[("lora", rank)], mean_counts
        assert mean_counts[("mora", rank)] > rank  # a high-rank update: beyond what LoRA of this rank can reach


def test_failing_jobs_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # Job 0 (rank=0) fails validation; job 1 gets a NaN loss at step 2 (fault injection fires once per
    # process) and stops mid-training; job 2 must still run and finish.
    result = run_cli(
        ["-m", "adapter=lora", "rank=0,2,4", *SWEEP_RUN, "trainer.max_steps=3", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=fault_env("nan@step=2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "1 of 3 jobs succeeded" in result.stderr and "the sweep goes on" in result.stderr

    invalid, diverged, finished = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
    error = json.loads((invalid / "error.json").read_text())
    assert error["error_type"] == "ConfigError" and error["user_error"] is True and "rank=0" in error["message"]
    assert "rank=0" in (invalid / "error.txt").read_text()
    error = json.loads((diverged / "error.json").read_text())
    assert error["error_type"] == "RunStopped" and "step 2" in error["message"]
    for job_dir in (invalid, diverged):
        assert not (job_dir / "metrics.json").exists()
    assert (finished / "metrics.json").is_file() and not (finished / "error.json").exists()

    report = build_report(sweep_dir, spectrum=False)
    rows = read_csv(report.csv_path)
    assert [r["status"] for r in rows] == ["failed", "failed", "ok"]
    assert "rank=0" in rows[0]["error"] and rows[0]["primary_value"] == ""
    assert "step 2" in rows[1]["error"] and rows[2]["error"] == ""
    markdown = report.markdown_path.read_text()
    assert "## Failed runs" in markdown and "ConfigError" in markdown and "RunStopped" in markdown


def test_a_stop_signal_ends_the_whole_sweep(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        ["-m", "adapter=lora", "rank=2,4", *SWEEP_RUN, "trainer.max_steps=2", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=fault_env("sigint@step=1"),
    )
    assert result.returncode == 130, result.stderr[-3000:]
    job_dirs = [p for p in sweep_dir.iterdir() if p.is_dir()]
    assert len(job_dirs) == 1, "the second job must not start after Ctrl-C"
    assert json.loads((job_dirs[0] / "error.json").read_text())["error_type"] == "RunStopped"

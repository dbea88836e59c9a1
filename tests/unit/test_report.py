"""Sweep report from hand-made run folders (no training): rows, failures, labels, job-failure records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mora_train.analysis.report import build_report
from mora_train.analysis.sweep import failed_job_metric, record_job_failure
from mora_train.cli.report import main as report_main
from mora_train.config.resolvers import safe_dirname
from mora_train.core.errors import ConfigError


def make_run(
    sweep: Path,
    name: str,
    adapter: str,
    rank: int | None,
    value: float | None,
    lr: float = 3e-4,
    metric: str = "char_accuracy",
    greater: bool = True,
) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    config = {
        "adapter": {"name": adapter},
        "rank": rank or 8,
        "task": {"name": "uuid"},
        "trainer": {"learning_rate": lr},
    }
    if adapter == "mora":
        config["adapter"]["mora_type"] = "rope"
    (run / "resolved_config.yaml").write_text(OmegaConf.to_yaml(config))
    (run / ".hydra" / "overrides.yaml").write_text(
        f"- adapter={adapter}\n- rank={rank}\n- trainer.learning_rate={lr}\n"
    )
    if value is not None:
        metrics = {
            "task": "uuid",
            "adapter": adapter,
            "rank": rank,
            "primary_metric": metric,
            "greater_is_better": greater,
            metric: value,
            "exact_match": value / 2,
            "train_loss": 2.0,
            "final_logged_loss": 1.5,
            "trainable_params": 1000,
            "train_runtime_s": 3.0,
            "tokens_per_s": 1234.5,
            "merge_max_abs_diff": 1e-7,
            "run": {"wall_time_s": 5.0, "world_size": 1, "resumed_from_step": None, "peak_gpu_memory_gib": 1.5},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
        steps = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)]
        (run / "log_history.json").write_text(json.dumps(steps))
    return run


def test_report_lists_every_run_and_every_failure(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_adapter=lora,rank=8", "lora", 8, 0.5)
    make_run(sweep, "1_adapter=lora,rank=32", "lora", 32, 0.6)
    make_run(sweep, "2_adapter=mora,rank=8", "mora", 8, 0.7)
    make_run(sweep, "10_adapter=full", "full", None, 0.9)
    failed = make_run(sweep, "3_adapter=mora,rank=32", "mora", 32, None)
    record_job_failure(failed, ConfigError(["`rank=32` is bad | really"]))
    make_run(sweep, "4_adapter=mora,rank=64", "mora", 64, None)  # killed: neither metrics nor error

    report = build_report(sweep, spectrum=False)
    with report.csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    # Natural job order (10 after 4), one row per run, failures included.
    assert [r["run"].split("_")[0] for r in rows] == ["0", "1", "2", "3", "4", "10"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed", "ok"]
    assert "rank=32" in rows[3]["error"] and "killed" in rows[4]["error"]
    assert rows[5]["rank"] == "" and rows[5]["adapter"] == "full"
    assert rows[0]["secondary_metrics"] == "exact_match=0.25"

    markdown = report.markdown_path.read_text()
    assert "6 runs: 4 finished, 2 failed" in markdown
    assert "Best: full" in markdown
    assert "ConfigError" in markdown and "\\|" in markdown  # the pipe in the message does not break the table
    assert set(report.plots) == {"loss", "metric_vs_rank"}  # one learning rate: no lr plot; spectrum skipped
    assert (sweep / "metric_vs_rank.png").stat().st_size > 0


def test_report_on_an_empty_folder_fails_cleanly(tmp_path: Path, capsys) -> None:
    assert report_main([str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err


def test_lr_sweep_gets_a_metric_vs_lr_plot_and_distinct_labels(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for i, lr in enumerate((1e-4, 1e-3, 1e-2)):
        make_run(sweep, f"{i}_trainer.learning_rate={lr}", "lora", 8, 0.1 * i, lr=lr)
    report = build_report(sweep, spectrum=False)
    assert "metric_vs_lr" in report.plots and "metric_vs_rank" not in report.plots
    labels = [r["label"] for r in report.rows]
    assert len(set(labels)) == 3 and all("learning_rate" in label for label in labels)


def test_job_failure_record_keeps_the_traceback_and_spares_finished_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as err:
        returned = record_job_failure(run, err)
    assert math.isnan(returned)
    error = json.loads((run / "error.json").read_text())
    assert error["user_error"] is False and error["message"] == "RuntimeError: CUDA out of memory"
    assert "Traceback" in error["traceback"] and "Traceback" in (run / "error.txt").read_text()

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.json").write_text("{}")
    assert math.isnan(record_job_failure(finished, RuntimeError("x")))
    assert not (finished / "error.json").exists()


def test_safe_dirname_is_short_flat_and_unique() -> None:
    assert safe_dirname("adapter=lora,rank=8") == "adapter=lora,rank=8"
    assert "/" not in safe_dirname("model.name_or_path=/models/x,rank=8")
    long_a = ",".join(f"trainer.key{i}=value" for i in range(30)) + ",rank=8"
    long_b = long_a[:-1] + "9"
    assert len(safe_dirname(long_a)) <= 120 and safe_dirname(long_a) != safe_dirname(long_b)
    assert safe_dirname("") == "defaults"


@pytest.mark.parametrize(
    "sweeper,expected",
    [
        ({"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}, math.nan),
        ({"direction": "maximize"}, -math.inf),
        ({"direction": ["minimize"]}, math.inf),
    ],
)
def test_failed_job_metric_is_the_worst_value_for_an_optimising_sweeper(sweeper: dict, expected: float) -> None:
    """Optuna aborts a study on NaN, so under a sweeper with a direction a failed job returns the worst value."""
    value = failed_job_metric(OmegaConf.create(sweeper))
    assert (math.isnan(value) and math.isnan(expected)) or value == expected


def test_a_loss_type_sweep_ranks_the_lowest_loss_best(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for i, loss in enumerate([2.5, 1.2, 3.0]):
        make_run(
            sweep, f"{i}_adapter=lora,rank={8 * (i + 1)}", "lora", 8 * (i + 1), loss, metric="eval_loss", greater=False
        )
    report = build_report(sweep, spectrum=False)
    text = (sweep / "report.md").read_text()
    assert "(lower is better)" in text and "eval_loss = 1.2" in text and "Best:" in text
    best_line = next(line for line in text.splitlines() if line.startswith("Best:"))
    assert "1_adapter=lora,rank=16" in best_line, best_line
    rows = {r["run"]: r for r in report.rows}
    # Bookkeeping (world size, resume step, memory) is never taken for a metric.
    assert all(
        "world_size" not in r["secondary_metrics"] and "peak_gpu" not in r["secondary_metrics"] for r in rows.values()
    )

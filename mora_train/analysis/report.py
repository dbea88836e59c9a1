"""Sweep directory -> report.md + report.csv + PNG plots, one row per run, failed runs included; runs that differ
only by seed also as one configuration each, with mean, sd, n and 95 % interval (report_seeds.csv, seeds.png).

    mora-train-report SWEEP_DIR [--threshold 0.1] [--no-spectrum] [--out DIR]   (mora_train.cli.report)

A run is any folder under SWEEP_DIR (at any depth) that holds metrics.json, error.json,
resolved_config.yaml or Hydra's .hydra/config.yaml; so several sweeps (or single runs) collected
under one parent folder make one report. A run that a live process is still writing (its run-dir
lock, mora_train.core.run_lock) is listed as running, and its files are not read further. A run
without metrics.json is listed as failed with its error (error.json, written by the CLI in multirun
mode) or as "no metrics.json" (killed, or crashed outside the pipeline).

Reading the runs: mora_train.analysis.runs; their rows, report.csv and report.md:
mora_train.analysis.report_tables; the plots: mora_train.analysis.report_plots.

The report's files go into --out (default: the sweep dir); a folder holding files of those names that
an earlier report did not write is refused, as is a place inside a run's adapter/, merged/ or checkpoints/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_train.analysis.report_plots import plot_losses, plot_metric_vs, plot_seeds, plot_spectra
from mora_train.analysis.report_seeds import SEEDS_CSV, write_seeds_csv
from mora_train.analysis.report_tables import CSV_COLUMNS, markdown, run_row, write_csv
from mora_train.analysis.runs import Run, attach_spectra, find_runs, unique_labels
from mora_train.analysis.seeds import SeedGroup, has_seeds, seed_groups
from mora_train.analysis.spectrum import DEFAULT_THRESHOLD
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_text_atomically
from mora_train.core.outputs import FILES, check_output_target
from mora_train.core.run_dir import RunDir


@dataclass
class Report:
    runs: list[Run]
    rows: list[dict[str, Any]]
    markdown_path: Path
    csv_path: Path
    plots: dict[str, Path]
    groups: list[SeedGroup]  # runs that differ only by seed, as configurations (analysis.seeds)


REPORT_FILES = (
    "report.md",
    "report.csv",
    SEEDS_CSV,
    "loss_curves.png",
    "metric_vs_rank.png",
    "metric_vs_lr.png",
    "seeds.png",
    "spectrum.png",
)


def is_earlier_report(folder: Path, sweep_dir: Path) -> bool:
    """The sweep dir itself (the report's documented home), or a folder whose report.csv this command wrote."""
    if os.path.realpath(folder) == os.path.realpath(sweep_dir):
        return True
    try:
        with open(Path(folder) / "report.csv", encoding="utf-8", errors="replace") as handle:
            return handle.readline().strip() == ",".join(CSV_COLUMNS)
    except OSError:
        return False


def check_report_target(out_dir: str | Path | None, sweep_dir: Path, runs: list[Run]) -> Path:
    """--out (default: the sweep dir), refused before anything is written (mora_train.core.outputs)."""
    target = sweep_dir if out_dir is None else out_dir
    protected = [run.path / name for run in runs for name in RunDir.OUTPUTS]
    return check_output_target(
        target,
        "mora-train-report",
        "--out",
        FILES,
        protected,
        ours=lambda folder: is_earlier_report(folder, sweep_dir),
        names=REPORT_FILES,
    )


def build_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    spectrum: bool = True,
) -> Report:
    """Read every run under sweep_dir; write report.md, report.csv and the PNG plots into out_dir
    (default sweep_dir)."""
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise MoraTrainError(
            f"no runs found under {sweep_dir} (no folder holds metrics.json, error.json or .hydra/config.yaml)"
        )
    out = check_report_target(out_dir, sweep_dir, runs)
    out.mkdir(parents=True, exist_ok=True)
    if spectrum:
        attach_spectra(runs)
    labels = unique_labels(runs)
    groups = seed_groups(runs)
    plots: dict[str, Path] = {}
    if plot_losses(runs, labels, out / "loss_curves.png"):
        plots["loss"] = out / "loss_curves.png"
    if has_seeds(groups) and plot_seeds(groups, out / "seeds.png"):
        plots["seeds"] = out / "seeds.png"
    if plot_metric_vs(runs, lambda r: r.rank, "rank", out / "metric_vs_rank.png"):
        plots["metric_vs_rank"] = out / "metric_vs_rank.png"
    if plot_metric_vs(runs, lambda r: r.learning_rate, "learning rate", out / "metric_vs_lr.png"):
        plots["metric_vs_lr"] = out / "metric_vs_lr.png"
    if spectrum and plot_spectra(runs, labels, threshold, out / "spectrum.png"):
        plots["spectrum"] = out / "spectrum.png"
    rows = [run_row(run, threshold, labels[run.name]) for run in runs]
    write_csv(rows, out / "report.csv")
    if has_seeds(groups):
        write_seeds_csv(groups, out / SEEDS_CSV)
    relative = {k: os.path.relpath(p, out) for k, p in plots.items()}
    write_text_atomically(out / "report.md", markdown(runs, rows, sweep_dir, relative, threshold, groups))
    return Report(runs, rows, out / "report.md", out / "report.csv", plots, groups)

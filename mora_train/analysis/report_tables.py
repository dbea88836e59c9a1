"""The report's rows: one per run, written as report.csv and as the tables of report.md."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

from mora_train.analysis.report_seeds import best_line, seeds_markdown
from mora_train.analysis.runs import Run
from mora_train.analysis.seeds import SeedGroup, best_group, has_seeds
from mora_train.analysis.spectrum import summarize
from mora_train.core.io import write_text_atomically
from mora_train.core.metrics import best as best_of
from mora_train.core.metrics import run_info

CSV_COLUMNS = [
    "run",
    "label",
    "status",
    "task",
    "adapter",
    "mora_type",
    "rank",
    "r_hat_range",
    "learning_rate",
    "trainable_params",
    "primary_metric",
    "primary_value",
    "secondary_metrics",
    "final_train_loss",
    "mean_train_loss",
    "wall_time_s",
    "tokens_per_s",
    "dw_sv_above_mean",
    "dw_sv_above_max",
    "error",
]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def run_row(run: Run, threshold: float, label: str) -> dict[str, Any]:
    metrics = run.metrics or {}
    primary_name, primary_value = run.primary
    spectrum = summarize(run.spectra, threshold) if run.spectra else None
    return {
        "run": run.name,
        "label": label,
        "status": run.status,
        "task": metrics.get("task") or run.get("task.name"),
        "adapter": run.adapter,
        "mora_type": run.mora_type or "",
        "variant": run.variant or "",  # report.md's type column (not a report.csv column)
        "rank": run.rank,
        "r_hat_range": run.r_hat_range,
        "learning_rate": run.learning_rate,
        "trainable_params": metrics.get("trainable_params"),
        "primary_metric": primary_name or "",
        "primary_value": primary_value,
        "secondary_metrics": ";".join(f"{k}={_fmt(v)}" for k, v in run.secondary.items()),
        "final_train_loss": metrics.get("final_logged_loss"),
        "mean_train_loss": metrics.get("train_loss"),
        "wall_time_s": run_info(metrics, "wall_time_s", metrics.get("wall_time_s")),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "dw_sv_above_mean": round(spectrum["mean"], 2) if spectrum else None,
        "dw_sv_above_max": spectrum["max"] if spectrum else None,
        "error": run.error_line or (f"spectrum: {run.spectrum_error}" if run.spectrum_error else ""),
    }


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})
    write_text_atomically(path, buffer.getvalue())


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _run_link(row: dict[str, Any]) -> str:
    """Short label linking to the run folder (folder names are long: they list the job's overrides)."""
    number = re.match(r"(\d+)_", Path(row["run"]).name)
    text = (f"#{number.group(1)} " if number else "") + row["label"]
    return f"[{_md_escape(text)}](<{row['run']}/>)"


def markdown(
    runs: list[Run],
    rows: list[dict[str, Any]],
    sweep_dir: Path,
    plots: dict[str, str],
    threshold: float,
    groups: list[SeedGroup] | None = None,
) -> str:
    """report.md: the counts and the best run (with seeds: the best configuration by mean), the configurations
    over their seeds, the finished runs' table, what failed or is running, the plots."""
    ok = [r for r, run in zip(rows, runs, strict=True) if run.ok]
    primary = next((r["primary_metric"] for r in ok if r["primary_metric"]), "primary metric")
    greater = next((run.greater_is_better for run in runs if run.ok), True)
    seeded = groups if groups and has_seeds(groups) else None
    lines = _heading(runs, ok, sweep_dir, primary)
    if seeded:
        best = best_group(seeded, greater)
        lines += [best_line(best, primary), ""] if best is not None else []
        lines += seeds_markdown(seeded, primary, greater)
    if ok:
        lines += ["## Runs", ""] if seeded else []
        lines += _results_table(ok, primary, threshold)
    lines += _problem_sections(runs, rows)
    lines += _plot_sections(plots, primary, threshold)
    return "\n".join(lines)


def _heading(runs: list[Run], ok: list[dict[str, Any]], sweep_dir: Path, primary: str) -> list[str]:
    failed = sum(not run.ok and not run.running for run in runs)
    running = sum(run.running for run in runs)
    # The direction each run's metrics.json declares for its task's primary metric.
    greater = next((run.greater_is_better for run in runs if run.ok), True)
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        (
            f"`{sweep_dir}` — {len(runs)} runs: {len(ok)} finished, {failed} failed"
            f"{f', {running} still running' if running else ''}. "
            f"Primary metric: **{primary}** ({'higher' if greater else 'lower'} is better). "
            "Every run is a row of `report.csv`."
        ),
        "",
    ]
    best = best_of(ok, lambda r: r["primary_value"], greater)
    if best:
        lines += [f"Best: {best['label']} (`{best['run']}`) with {primary} = {_fmt(best['primary_value'])}.", ""]
    return lines


def _results_table(ok: list[dict[str, Any]], primary: str, threshold: float) -> list[str]:
    """The finished runs, one table row each (the ΔW column only when some run has a spectrum)."""
    has_spectrum = any(r["dw_sv_above_mean"] is not None for r in ok)
    header = [
        "run",
        "adapter",
        "type",
        "rank",
        "r̂",
        "lr",
        "trainable",
        primary,
        "other metrics",
        "final loss",
        "wall s",
        "tokens/s",
    ]
    if has_spectrum:
        header.append(f"ΔW sv>{threshold:g} mean/max")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in ok:
        cells = [
            _run_link(r),
            r["adapter"],
            r["mora_type"] or r["variant"],
            _fmt(r["rank"]),
            r["r_hat_range"],
            _fmt(r["learning_rate"]),
            _fmt(r["trainable_params"]),
            _fmt(r["primary_value"]),
            r["secondary_metrics"].replace(";", ", "),
            _fmt(r["final_train_loss"]),
            _fmt(r["wall_time_s"], 3),
            _fmt(r["tokens_per_s"], 3),
        ]
        if has_spectrum:
            cells.append("" if r["dw_sv_above_mean"] is None else f"{r['dw_sv_above_mean']:g} / {r['dw_sv_above_max']}")
        lines.append("| " + " | ".join(c if i == 0 else _md_escape(c) for i, c in enumerate(cells)) + " |")
    lines.append("")
    return lines


def _problem_sections(runs: list[Run], rows: list[dict[str, Any]]) -> list[str]:
    """Failed runs with their error, runs still being written, and notes on finished runs (a failed spectrum)."""
    failed = [(r, run) for r, run in zip(rows, runs, strict=True) if not run.ok and not run.running]
    running = [(r, run) for r, run in zip(rows, runs, strict=True) if run.running]
    lines: list[str] = []
    if failed:
        lines += ["## Failed runs", ""]
        for row, run in failed:
            kind = f" ({run.error.get('error_type')})" if run.error else ""
            lines.append(f"- {_run_link(row)}{kind}: {_md_escape(run.error_line)}")
            if run.error and not run.error.get("user_error", True):
                lines.append(f"  (traceback in `{run.name}/error.txt`)")
        lines.append("")
    if running:
        lines += (
            ["## Still running", ""]
            + [f"- {_run_link(row)}: {_md_escape(run.error_line)}" for row, run in running]
            + [""]
        )
    notes = [(r["run"], r["error"]) for r, run in zip(rows, runs, strict=True) if run.ok and r["error"]]
    if notes:
        lines += ["## Notes", ""] + [f"- `{name}`: {_md_escape(text)}" for name, text in notes] + [""]
    return lines


def _plot_sections(plots: dict[str, str], primary: str, threshold: float) -> list[str]:
    lines: list[str] = []
    titles = {
        "loss": "Training loss",
        "seeds": f"{primary} per configuration: mean and 95 % interval over its seeds",
        "metric_vs_rank": f"{primary} against rank",
        "metric_vs_lr": f"{primary} against learning rate",
        "spectrum": f"ΔW spectrum: singular values > {threshold:g} per layer (paper Fig. 5)",
    }
    for key, filename in plots.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({filename})", ""]
    if "spectrum" in plots:
        lines += [
            (
                f"Mean over each block's adapted layers of the number of singular values of ΔW above {threshold:g} "
                "(LoRA's count is at most its rank; MoRA's can reach r̂). Per-layer singular values: "
                "`RUN/spectrum.safetensors`; per-run plot: `mora-train-spectrum RUN`."
            ),
            "",
        ]
    return lines

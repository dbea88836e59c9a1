"""Sweep directory -> report.md + report.csv + PNG plots, one row per run, failed runs included.

    mora-train-report SWEEP_DIR [--threshold 0.1] [--no-spectrum] [--out DIR]

A run is any folder under SWEEP_DIR (at any depth) that holds metrics.json, error.json,
resolved_config.yaml or Hydra's .hydra/config.yaml; so several sweeps (or single runs) collected
under one parent folder make one report. A run that a live process is still writing (its run-dir
lock, mora_train.core.run_lock) is listed as running, and its files are not read further. A run
without metrics.json is listed as failed with its error (error.json, written by the CLI in multirun
mode) or as "no metrics.json" (killed, or crashed outside the pipeline).

The report's files go into --out (default: the sweep dir); a folder holding files of those names that
an earlier report did not write is refused, as is a place inside a run's adapter/, merged/ or checkpoints/.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mora_train.adapters import adapter_identity
from mora_train.analysis.spectrum import (
    DEFAULT_THRESHOLD,
    LayerSpectrum,
    cached_run_spectrum,
    per_block_mean,
    pyplot,
    save_figure,
    summarize,
)
from mora_train.analysis.sweep import ERROR_JSON, METRICS_JSON, read_error
from mora_train.core.errors import MoraTrainError, non_negative_float, report_unexpected
from mora_train.core.io import write_text_atomically
from mora_train.core.metrics import best as best_of
from mora_train.core.metrics import greater_is_better, metrics_of, primary_value, run_info
from mora_train.core.outputs import FILES, check_output_target
from mora_train.core.run_lock import holder_of
from mora_train.pipeline.run_config import adapter_settings_of

log = logging.getLogger(__name__)

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


@dataclass
class Run:
    """One job of a sweep, as read from its folder."""

    path: Path
    name: str  # path relative to the sweep dir
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    overrides: list[str] = field(default_factory=list)
    spectra: list[LayerSpectrum] | None = None
    spectrum_error: str | None = None
    writer: str | None = None  # the live process still writing the run (its run-dir lock), if any

    @property
    def ok(self) -> bool:
        return self.metrics is not None

    @property
    def running(self) -> bool:
        return self.writer is not None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "running" if self.running else "failed"

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key ('adapter.name'), from metrics.json when it has it."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def adapter(self) -> str:
        return (self.metrics or {}).get("adapter") or self.get("adapter.name") or "?"

    @property
    def mora_type(self) -> str | None:
        """The operator pair the run's method records (methods without one: None)."""
        recorded = ((self.metrics or {}).get("adapter_config") or {}).get("mora_type")
        value = recorded if recorded is not None else self.get("adapter.mora_type")
        return str(value) if value is not None else None

    @property
    def rank(self) -> int | None:
        """The rank the run's method has (None for methods without one, such as full fine-tuning)."""
        if self.metrics and "rank" in self.metrics:
            rank = self.metrics["rank"]
        else:
            try:
                rank = adapter_identity(adapter_settings_of(self.get("adapter") or {}), self.get("rank")).get("rank")
            except MoraTrainError:  # a config without a known adapter (an unreadable run)
                rank = self.get("rank")
        return rank if isinstance(rank, int) else None

    @property
    def learning_rate(self) -> float | None:
        lr = self.get("trainer.learning_rate")
        return float(lr) if isinstance(lr, (int, float)) else None

    @property
    def primary(self) -> tuple[str | None, float | None]:
        if not self.metrics:
            return None, None
        # primary_value also finds a primary metric of lm-evaluation-harness's section (eval.backend=lm_eval).
        return self.metrics.get("primary_metric"), primary_value(self.metrics)

    @property
    def secondary(self) -> dict[str, float]:
        if not self.metrics:
            return {}
        primary = self.metrics.get("primary_metric")
        return {k: v for k, v in metrics_of(self.metrics).items() if k != primary}

    @property
    def greater_is_better(self) -> bool:
        return greater_is_better(self.metrics or {})

    @property
    def r_hat_range(self) -> str:
        """'min-max' of MoRA's square sides over the adapted layers (adapter/adapter_config.json; '' without)."""
        path = self.path / "adapter" / "adapter_config.json"
        try:
            modules = json.loads(path.read_text()).get("modules", {})
        except (OSError, json.JSONDecodeError):
            return ""
        sides = [m["r_hat"] for m in modules.values() if "r_hat" in m]
        if not sides:
            return ""
        return str(min(sides)) if min(sides) == max(sides) else f"{min(sides)}-{max(sides)}"

    @property
    def error_line(self) -> str:
        if self.ok:
            return ""
        if self.running:
            return f"still being written by {self.writer}"
        if self.error is None:
            return (
                "no metrics.json and no error.json: the job was killed, crashed outside the pipeline, "
                "or is still running"
            )
        return " ".join(str(self.error.get("message", "")).split())  # one line, for tables and CSV

    def label(self) -> str:
        """Short legend text: adapter, MoRA type, rank."""
        text = self.adapter
        if self.mora_type:
            text += f"({self.mora_type})"
        if self.rank is not None:
            text += f" r={self.rank}"
        return text


def _load_yaml(path: Path) -> dict[str, Any]:
    """A YAML config as a plain dict, interpolations left as text (Hydra's ${hydra:...} cannot resolve here)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - a half-written file must not stop the report
        log.warning("cannot read %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _is_run_dir(path: Path) -> bool:
    return any(
        (path / name).is_file() for name in (METRICS_JSON, ERROR_JSON, "resolved_config.yaml", ".hydra/config.yaml")
    )


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_runs(sweep_dir: Path) -> list[Run]:
    """Every run under sweep_dir, in job order (Hydra's numeric prefixes sort naturally)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MoraTrainError(
            f"{sweep_dir} is not a folder; give the sweep dir of `mora-train -m ...` (multirun/DATE/TIME)"
        )
    found: list[Path] = []
    for root, dirs, _files in os.walk(sweep_dir):
        here = Path(root)
        if _is_run_dir(here):
            found.append(here)
            dirs[:] = []  # a run's own subfolders (merged/, adapter/, checkpoints/) hold no runs
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    runs = []
    for path in found:
        config_path = path / "resolved_config.yaml"
        if not config_path.is_file():
            config_path = path / ".hydra" / "config.yaml"
        config = _load_yaml(config_path) if config_path.is_file() else {}
        metrics = None
        holder = holder_of(path)
        if holder is None and (path / METRICS_JSON).is_file():  # a running run's metrics.json may be replaced
            try:
                metrics = json.loads((path / METRICS_JSON).read_text())
            except json.JSONDecodeError:
                log.warning("%s/metrics.json is not valid JSON; the run is listed as failed", path)
        overrides_path = path / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in (_load_yaml_list(overrides_path) if overrides_path.is_file() else [])]
        name = str(path.relative_to(sweep_dir)) if path != sweep_dir else path.name
        runs.append(
            Run(path, name, config, metrics, read_error(path), overrides, writer=holder.describe() if holder else None)
        )
    runs.sort(key=lambda r: _natural_key(r.name))
    return runs


def _load_yaml_list(path: Path) -> list:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - an unreadable overrides file means no overrides to show
        return []
    return data if isinstance(data, list) else []


def unique_labels(runs: list[Run]) -> dict[str, str]:
    """Run name -> legend label; where adapter/type/rank do not tell runs apart, add what their overrides vary."""
    labels = {r.name: r.label() for r in runs}
    shared = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    for run in runs:
        if seen[labels[run.name]] > 1:
            extra = [
                o
                for o in run.overrides
                if o not in shared and o.split("=")[0].lstrip("+~") not in ("adapter", "rank", "adapter.mora_type")
            ]
            labels[run.name] += " " + (",".join(extra) if extra else run.name.split("_")[0])
    return labels


# -- spectrum -----------------------------------------------------------------------------------------


def attach_spectra(runs: list[Run]) -> None:
    """ΔW singular values for every finished run (cached per run); a failure is noted, not fatal."""
    for run in runs:
        if not run.ok:
            continue
        started = time.time()
        try:
            run.spectra, _source = cached_run_spectrum(run.path)
        except Exception as err:  # noqa: BLE001 - one unreadable run must not sink the report
            run.spectrum_error = f"{type(err).__name__}: {err}"
            log.warning("ΔW spectrum of %s failed: %s", run.name, run.spectrum_error)
            continue
        log.info("ΔW spectrum of %s: %d layers in %.1f s", run.name, len(run.spectra), time.time() - started)


# -- tables ---------------------------------------------------------------------------------------------


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
    runs: list[Run], rows: list[dict[str, Any]], sweep_dir: Path, plots: dict[str, str], threshold: float
) -> str:
    ok = [r for r, run in zip(rows, runs, strict=True) if run.ok]
    failed = [(r, run) for r, run in zip(rows, runs, strict=True) if not run.ok and not run.running]
    running = [(r, run) for r, run in zip(rows, runs, strict=True) if run.running]
    primary = next((r["primary_metric"] for r in ok if r["primary_metric"]), "primary metric")
    # The direction each run's metrics.json declares for its task's primary metric.
    greater = next((run.greater_is_better for run in runs if run.ok), True)
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        (
            f"`{sweep_dir}` — {len(runs)} runs: {len(ok)} finished, {len(failed)} failed"
            f"{f', {len(running)} still running' if running else ''}. "
            f"Primary metric: **{primary}** ({'higher' if greater else 'lower'} is better). "
            "Every run is a row of `report.csv`."
        ),
        "",
    ]
    best = best_of(ok, lambda r: r["primary_value"], greater)
    if best:
        lines += [f"Best: {best['label']} (`{best['run']}`) with {primary} = {_fmt(best['primary_value'])}.", ""]
    if ok:
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
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ok:
            cells = [
                _run_link(r),
                r["adapter"],
                r["mora_type"],
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
                cells.append(
                    "" if r["dw_sv_above_mean"] is None else f"{r['dw_sv_above_mean']:g} / {r['dw_sv_above_max']}"
                )
            lines.append("| " + " | ".join(c if i == 0 else _md_escape(c) for i, c in enumerate(cells)) + " |")
        lines.append("")
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
    titles = {
        "loss": "Training loss",
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
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------------


def _loss_points(run: Run) -> list[tuple[float, float]]:
    path = run.path / "log_history.json"
    try:
        history = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [(h["step"], h["loss"]) for h in history if isinstance(h, dict) and "loss" in h and "step" in h]


def plot_losses(runs: list[Run], labels: dict[str, str], path: Path) -> bool:
    curves = [(labels[r.name], _loss_points(r)) for r in runs if r.ok]
    curves = [(label, points) for label, points in curves if points]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="o", markersize=2, linewidth=1.2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    low = min(loss for _, points in curves for _, loss in points)
    high = max(loss for _, points in curves for _, loss in points)
    if low > 0 and high / low > 10:  # log scale only when losses span more than a decade
        ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    save_figure(fig, path)
    return True


def _series_key(run: Run) -> str:
    return run.adapter + (f" ({run.mora_type})" if run.mora_type else "")


def plot_metric_vs(runs: list[Run], x_of: Any, xlabel: str, path: Path) -> bool:
    """Primary metric against x (rank or learning rate), one line per adapter (and MoRA type); full FT as a level."""
    ok = [(run, value) for run in runs if run.ok and (value := run.primary[1]) is not None]
    series: dict[str, list[tuple[float, float]]] = {}
    levels: dict[str, float] = {}
    for run, value in ok:
        x = x_of(run)
        if x is None:
            if run.rank is None and xlabel == "rank":  # a method without a rank: one level across the plot
                label = f"{run.adapter} (no rank)"
                levels[label if label not in levels else f"{label} {run.name}"] = value
            continue
        series.setdefault(_series_key(run), []).append((x, value))
    if len({x for points in series.values() for x, _ in points}) < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    for name, level in levels.items():
        ax.axhline(level, color="black", linestyle="--", linewidth=1, label=name)
    ax.set_xscale("log", base=2 if xlabel == "rank" else 10)
    if xlabel == "rank":
        ticks = sorted({x for points in series.values() for x, _ in points})
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ok[0][0].primary[0] or "primary metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_spectra(runs: list[Run], labels: dict[str, str], threshold: float, path: Path) -> bool:
    curves = [(labels[r.name], per_block_mean(r.spectra, threshold)) for r in runs if r.ok and r.spectra]
    curves = [(label, blocks) for label, blocks in curves if blocks]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, blocks in curves:
        ax.plot(list(blocks), list(blocks.values()), marker="o", markersize=3, label=label)
    ax.set_xlabel("transformer block")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"singular values of ΔW > {threshold:g}\n(mean over the block's layers)")
    ax.set_title("ΔW spectrum per block")
    ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    save_figure(fig, path)
    return True


# -- entry points ---------------------------------------------------------------------------------------


@dataclass
class Report:
    runs: list[Run]
    rows: list[dict[str, Any]]
    markdown_path: Path
    csv_path: Path
    plots: dict[str, Path]


REPORT_FILES = ("report.md", "report.csv", "loss_curves.png", "metric_vs_rank.png", "metric_vs_lr.png", "spectrum.png")
RUN_OUTPUTS = ("adapter", "merged", "merged-unverified", "checkpoints")  # never written into


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
    protected = [run.path / name for run in runs for name in RUN_OUTPUTS]
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
    plots: dict[str, Path] = {}
    if plot_losses(runs, labels, out / "loss_curves.png"):
        plots["loss"] = out / "loss_curves.png"
    if plot_metric_vs(runs, lambda r: r.rank, "rank", out / "metric_vs_rank.png"):
        plots["metric_vs_rank"] = out / "metric_vs_rank.png"
    if plot_metric_vs(runs, lambda r: r.learning_rate, "learning rate", out / "metric_vs_lr.png"):
        plots["metric_vs_lr"] = out / "metric_vs_lr.png"
    if spectrum and plot_spectra(runs, labels, threshold, out / "spectrum.png"):
        plots["spectrum"] = out / "spectrum.png"
    rows = [run_row(run, threshold, labels[run.name]) for run in runs]
    write_csv(rows, out / "report.csv")
    relative = {k: os.path.relpath(p, out) for k, p in plots.items()}
    write_text_atomically(out / "report.md", markdown(runs, rows, sweep_dir, relative, threshold))
    return Report(runs, rows, out / "report.md", out / "report.csv", plots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mora-train-report",
        description="Turn a sweep dir (mora-train -m ...) into report.md, report.csv and PNG plots.",
    )
    parser.add_argument("sweep_dir", help="the multirun folder (multirun/DATE/TIME), or any folder holding runs")
    parser.add_argument("--out", help="where to write the report (default: the sweep dir)")
    parser.add_argument(
        "--threshold",
        type=non_negative_float,
        default=DEFAULT_THRESHOLD,
        help="count singular values of ΔW above this (default %(default)s, the paper's)",
    )
    parser.add_argument(
        "--no-spectrum", action="store_true", help="skip the ΔW spectrum (it loads each run's base model)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = build_report(args.sweep_dir, args.out, args.threshold, spectrum=not args.no_spectrum)
    except MoraTrainError as err:
        print(f"mora-train-report: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:  # the report folder cannot be written (read-only, a file, full disk)
        print(
            "mora-train-report: error: cannot write the report "
            f"({err.strerror or err}: {err.filename or args.out or args.sweep_dir}); "
            "choose a writable folder with --out DIR",
            file=sys.stderr,
        )
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line and the traceback in a file, never a bare traceback
        report_unexpected("mora-train-report", err, None)
        return 1
    failed = sum(not r.ok and not r.running for r in report.runs)
    running = sum(r.running for r in report.runs)
    print(
        f"{len(report.runs)} runs ({failed} failed{f', {running} still running' if running else ''}): "
        f"{report.markdown_path}, {report.csv_path}" + "".join(f", {p.name}" for p in report.plots.values())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

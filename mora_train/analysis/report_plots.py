"""The report's PNG plots: training loss, the primary metric against rank and learning rate, ΔW spectra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mora_train.analysis.runs import Run
from mora_train.analysis.seeds import SeedGroup
from mora_train.analysis.spectrum import per_block_mean, pyplot, save_figure
from mora_train.analysis.stats import summarize
from mora_train.core.run_dir import RunDir


def _loss_points(run: Run) -> list[tuple[float, float]]:
    path = RunDir(run.path).log_history
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
    kind = run.mora_type or run.variant
    return run.adapter + (f" ({kind})" if kind else "")


def plot_seeds(groups: list[SeedGroup], path: Path) -> bool:
    """Each configuration's mean primary metric over its seeds with its 95 % interval, best at the top."""
    points = [(g.label, g.primary, g.n) for g in groups if g.primary is not None]
    if not points:
        return False
    greater = groups[0].runs[0].greater_is_better
    points.sort(key=lambda p: p[1].mean, reverse=not greater)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(points)))
    ys = list(range(len(points)))[::-1]
    means = [summary.mean for _, summary, _ in points]
    errors = [summary.half_width or 0.0 for _, summary, _ in points]
    ax.errorbar(means, ys, xerr=errors, fmt="o", capsize=4)
    ax.set_yticks(ys, [f"{label} (n={n})" for label, _, n in points])
    ax.set_xlabel(f"{groups[0].primary_metric}: mean over seeds, 95 % interval")
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)
    return True


def _mean_and_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the 95 % interval's half width (0 for a single value) of the runs at one point (their seeds)."""
    summary = summarize(values)
    assert summary is not None  # values are the finite primary values of finished runs
    return summary.mean, summary.half_width or 0.0


def plot_metric_vs(runs: list[Run], x_of: Any, xlabel: str, path: Path) -> bool:
    """Primary metric against x (rank or learning rate), one line per adapter (and MoRA type or variant); full FT
    as a level. Runs at the same point (seeds) are averaged, with their 95 % interval as error bars."""
    ok = [(run, value) for run in runs if run.ok and (value := run.primary[1]) is not None]
    series: dict[str, dict[float, list[float]]] = {}
    levels: dict[str, list[float]] = {}
    for run, value in ok:
        x = x_of(run)
        if x is None:
            if run.rank is None and xlabel == "rank":  # a method without a rank: one level across the plot
                levels.setdefault(f"{run.adapter} (no rank)", []).append(value)
            continue
        series.setdefault(_series_key(run), {}).setdefault(x, []).append(value)
    if len({x for points in series.values() for x in points}) < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in sorted(series.items()):
        xs = sorted(points)
        means, errors = zip(*(_mean_and_interval(points[x]) for x in xs), strict=True)
        ax.errorbar(xs, means, yerr=errors if any(errors) else None, marker="o", capsize=3, label=name)
    for name, values in levels.items():
        ax.axhline(_mean_and_interval(values)[0], color="black", linestyle="--", linewidth=1, label=name)
    ax.set_xscale("log", base=2 if xlabel == "rank" else 10)
    if xlabel == "rank":
        ticks = sorted({x for points in series.values() for x in points})
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

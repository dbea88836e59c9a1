"""The report's PNG plots: training loss, the primary metric against rank and learning rate, ΔW spectra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mora_train.analysis.runs import Run
from mora_train.analysis.spectrum import per_block_mean, pyplot, save_figure
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

"""The report's seed section: one row per configuration (runs that differ only by seed, analysis.seeds) with the
mean, standard deviation, n and 95 % interval of its metrics (report.md), every metric of every configuration
in report_seeds.csv, and the best configuration by mean."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from mora_train.analysis.seeds import SeedGroup
from mora_train.analysis.stats import CONFIDENCE, Summary
from mora_train.core.io import write_text_atomically

SEEDS_CSV = "report_seeds.csv"
SEEDS_CSV_COLUMNS = [
    "configuration",
    "label",
    "metric",
    "n",
    "seeds",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "unfinished_runs",
    "runs",
]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_seeds_csv(groups: list[SeedGroup], path: Path) -> None:
    """One row per (configuration, metric): n, the seeds, mean, sd and the 95 % interval."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SEEDS_CSV_COLUMNS)
    writer.writeheader()
    for index, group in enumerate(groups, start=1):
        for metric, summary in group.stats.items():
            writer.writerow(
                {
                    "configuration": index,
                    "label": group.label,
                    "metric": metric,
                    "n": summary.n,
                    "seeds": " ".join(str(s) for s in group.seeds),
                    "mean": _number(summary.mean),
                    "std": _number(summary.std),
                    "ci_low": _number(summary.ci_low),
                    "ci_high": _number(summary.ci_high),
                    "unfinished_runs": group.unfinished,
                    "runs": " ".join(run.name for run in group.runs),
                }
            )
    write_text_atomically(path, buffer.getvalue())


def best_line(group: SeedGroup, primary: str) -> str:
    """`Best configuration by mean ...: LABEL, mean (95 % CI [lo, hi], sd, n = 3, seeds 0 1 2).`"""
    summary = group.primary
    assert summary is not None  # best_group picks a group with a primary mean
    spread = (
        f"{int(CONFIDENCE * 100)} % CI {summary.interval_text()}, sd {summary.std:.3g}, "
        if summary.std is not None
        else "one run, no interval, "
    )
    seeds = " ".join(str(s) for s in group.seeds)
    return (
        f"Best configuration by mean {primary} over its seeds: {group.label} with {primary} = {summary.mean:.4g} "
        f"({spread}n = {group.n}, seeds {seeds})."
    )


def _cell(summary: Summary | None) -> str:
    return "" if summary is None else summary.text()


def seeds_markdown(groups: list[SeedGroup], primary: str, greater: bool) -> list[str]:
    """The seed section of report.md: the configurations best mean first, then how to read them."""

    def order(group: SeedGroup) -> float:
        mean = group.primary.mean if group.primary is not None else float("nan")
        return -mean if greater else mean

    ranked = sorted(groups, key=lambda g: (g.primary is None, order(g) if g.primary is not None else 0.0))
    header = ["configuration", "n", "seeds", f"{primary} (mean ± CI)", "95 % CI", "sd", "final loss", "other metrics"]
    lines = [
        f"## Seeds: mean ± {int(CONFIDENCE * 100)} % confidence interval",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for group in ranked:
        summary = group.primary
        others = [
            f"{name}={_cell(s)}"
            for name, s in group.stats.items()
            if name not in (primary, "final_train_loss", "mean_train_loss", "wall_time_s", "tokens_per_s")
        ]
        unfinished = f" (+{group.unfinished} unfinished)" if group.unfinished else ""
        cells: list[Any] = [
            group.label.replace("|", "\\|"),
            f"{group.n}{unfinished}",
            " ".join(str(s) for s in group.seeds),
            _cell(summary),
            summary.interval_text() if summary is not None else "",
            f"{summary.std:.3g}" if summary is not None and summary.std is not None else "",
            _cell(group.stats.get("final_train_loss")),
            ", ".join(others).replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        (
            "Runs whose configs differ only by `seed` are one configuration. ± is the half width of the "
            f"{int(CONFIDENCE * 100)} % Student-t interval of the mean (t quantile at n - 1 degrees of freedom x "
            f"sd / √n); with one run there is none. Every metric of every configuration: `{SEEDS_CSV}`."
        ),
        "",
    ]
    return lines

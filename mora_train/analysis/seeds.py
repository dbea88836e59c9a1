"""Runs that differ only by their seed, as one configuration: mean, standard deviation, n and a 95 % Student-t
interval of every metric over its seeds (analysis.stats), and the best configuration by mean.

Two runs are seeds of one configuration when their resolved configs are equal once the keys that name the seed
or where and how the run was written (SEED_BLIND_KEYS) are set aside. A sweep over `seed=0,1,2` (+sweep=seeds)
gives such groups; so do runs of the same command with different seeds collected under one folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mora_train.analysis.runs import Run, unique_labels
from mora_train.analysis.stats import Summary, summarize
from mora_train.core.metrics import best, run_info

# Config keys that do not make a configuration: the seed itself, and where or how the run was written or logged.
SEED_BLIND_KEYS = ("seed", "output_dir", "overwrite", "trainer.resume", "logging")
# Training results shown beside the task's metrics (metrics.json key -> the report's name).
TRAINING_METRICS = {
    "final_logged_loss": "final_train_loss",
    "train_loss": "mean_train_loss",
    "tokens_per_s": "tokens_per_s",
}


def configuration(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without SEED_BLIND_KEYS."""
    kept = copy.deepcopy(config)
    for dotted in SEED_BLIND_KEYS:
        *parents, last = dotted.split(".")
        node: Any = kept
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return kept


def configuration_key(run: Run) -> str:
    """Equal for runs that differ only by seed (and by where they were written)."""
    return json.dumps(configuration(run.config), sort_keys=True, default=str)


def run_metrics(run: Run) -> dict[str, float]:
    """Every metric of a finished run by the report's names: the primary metric, the task's others, the training
    results of TRAINING_METRICS and the wall time."""
    metrics = run.metrics or {}
    name, value = run.primary
    values: dict[str, Any] = {name: value} if name else {}
    values.update(run.secondary)
    values.update({shown: metrics.get(key) for key, shown in TRAINING_METRICS.items()})
    values["wall_time_s"] = run_info(metrics, "wall_time_s", metrics.get("wall_time_s"))
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class SeedGroup:
    """One configuration: its finished runs (one per seed), how many of its runs did not finish, and every
    metric summarized over the finished ones."""

    runs: list[Run]
    unfinished: int = 0
    label: str = ""
    stats: dict[str, Summary] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    @property
    def primary_metric(self) -> str | None:
        return self.runs[0].primary[0] if self.runs else None

    @property
    def primary(self) -> Summary | None:
        name = self.primary_metric
        return self.stats.get(name) if name else None


def seed_groups(runs: list[Run]) -> list[SeedGroup]:
    """The configurations of `runs` in the order of their first run, each with its metrics summarized; a
    configuration none of whose runs finished is left out (the report lists those runs as failed)."""
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(configuration_key(run), []).append(run)
    groups = []
    for members in grouped.values():
        finished = [run for run in members if run.ok]
        if not finished:
            continue
        per_run = [run_metrics(run) for run in finished]
        names = list(dict.fromkeys(name for values in per_run for name in values))
        stats = {name: summarize(values.get(name) for values in per_run) for name in names}
        groups.append(
            SeedGroup(finished, len(members) - len(finished), stats={k: v for k, v in stats.items() if v is not None})
        )
    _label(groups)
    return groups


def _label(groups: list[SeedGroup]) -> None:
    """Each group's legend label: its first run's, told apart from the others' by what the overrides vary,
    the seed left out."""
    representatives = [
        dataclasses.replace(g.runs[0], overrides=[o for o in g.runs[0].overrides if _key(o) != "seed"]) for g in groups
    ]
    labels = unique_labels(representatives)
    for group, run in zip(groups, representatives, strict=True):
        group.label = labels[run.name]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def has_seeds(groups: list[SeedGroup]) -> bool:
    """Whether any configuration ran with more than one seed (the report then shows means and intervals)."""
    return any(group.n > 1 for group in groups)


def best_group(groups: list[SeedGroup], greater: bool) -> SeedGroup | None:
    """The configuration with the best mean primary metric in the task's direction."""
    return best(groups, lambda g: g.primary.mean if g.primary is not None else None, greater)

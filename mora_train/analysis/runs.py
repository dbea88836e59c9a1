"""The runs of a sweep dir, as the report reads them: config, metrics, error record, overrides and ΔW spectra.

A run is any folder under the sweep dir (at any depth) that holds metrics.json, error.json,
resolved_config.yaml or Hydra's .hydra/config.yaml. A run that a live process is still writing (its run-dir
lock, mora_train.core.run_lock) is listed as running, and its files are not read further.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mora_train.adapters import adapter_identity
from mora_train.analysis.spectrum import LayerSpectrum, cached_run_spectrum
from mora_train.analysis.sweep import read_error
from mora_train.core.errors import MoraTrainError
from mora_train.core.metrics import greater_is_better, metrics_of, primary_value
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import holder_of
from mora_train.pipeline.run_config import adapter_settings_of

log = logging.getLogger(__name__)


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
    def variant(self) -> str | None:
        """The method's own variant as its adapter records it (the LoRA family's rslora, dora, pissa, ...)."""
        recorded = ((self.metrics or {}).get("adapter_config") or {}).get("variant")
        return str(recorded) if recorded else None

    @property
    def seed(self) -> int | None:
        seed = self.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

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
        path = RunDir(self.path).adapter / "adapter_config.json"
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
        """Short legend text: adapter, MoRA type or variant, rank."""
        text = self.adapter
        kind = self.mora_type or self.variant
        if kind:
            text += f"({kind})"
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
    run = RunDir(path)
    return any(p.is_file() for p in (run.metrics, run.error_json, run.resolved_config, run.hydra_config))


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
        config_path = RunDir(path).resolved_config
        if not config_path.is_file():
            config_path = RunDir(path).hydra_config
        config = _load_yaml(config_path) if config_path.is_file() else {}
        metrics = None
        holder = holder_of(path)
        if holder is None and (RunDir(path).metrics).is_file():  # a running run's metrics.json may be replaced
            try:
                metrics = json.loads((RunDir(path).metrics).read_text())
            except json.JSONDecodeError:
                log.warning("%s/metrics.json is not valid JSON; the run is listed as failed", path)
        overrides_path = RunDir(path).hydra_overrides
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


# -- ΔW spectra ---------------------------------------------------------------------------------------


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

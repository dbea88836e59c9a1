"""Hydra's multirun callback (configs/config.yaml: hydra.callbacks.sweep_summary): after `mora-train -m`, how
many jobs finished or failed, and the command that makes the report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mora_train.analysis.sweep import sweep_job_dirs, sweep_started
from mora_train.core.run_dir import RunDir


class SweepSummary(Callback):
    """After a multirun: how many jobs finished or failed, and the command that makes the report."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_started(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_job_dirs(sweep_dir)
        failed = [j for j in jobs if not (RunDir(j).metrics).exists()]
        lines = [f"\nsweep finished: {len(jobs) - len(failed)} of {len(jobs)} jobs succeeded in {sweep_dir}"]
        for job in failed:
            reason = "see error.txt" if (RunDir(job).error_json).exists() else "no metrics.json"
            lines.append(f"  failed: {job.name} ({reason})")
        lines.append(f"report: mora-train-report {sweep_dir}")
        print("\n".join(lines), file=sys.stderr if failed else sys.stdout, flush=True)

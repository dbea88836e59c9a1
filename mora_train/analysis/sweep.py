"""Multirun support: a failed job records its error and the sweep goes on; a summary at the end.

Hydra runs the jobs of a multirun one after another in one process. A job that raised would
stop the sweep (a SystemExit at once, any other exception once its batch is done), so in
multirun mode the CLI hands failures to `record_job_failure`, which writes `error.json` and
`error.txt` into the job's run dir and returns a metric that lets the sweep go on: NaN for
Hydra's basic sweeper (which ignores it), and the worst possible value for an optimising
sweeper that declares a direction (-inf when maximizing, +inf when minimizing): the Optuna
sweeper (hydra-optuna-sweeper 1.2) aborts the whole study when a job returns NaN or None.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any

from mora_train.config.overrides import paste_command
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically, write_text_atomically
from mora_train.core.run_dir import RunDir

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    """True inside a job of `mora-train -m ...` (Hydra's MULTIRUN mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def jobs_run_apart() -> bool:
    """True when the sweep's launcher runs every job in a process of its own (submitit, Ray: anything but
    Hydra's basic launcher). A job stopped by a signal there (a SLURM time limit) ends only itself: it must
    hand its launcher a result, or the launcher fails the whole `mora-train -m` without a summary."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(HydraConfig.get().launcher.get("_target_") or BASIC_LAUNCHER)
    return target != BASIC_LAUNCHER


def _job_label() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "job"
    job = HydraConfig.get().job
    return f"job {_hydra_value(job, 'num', '?')} ({_hydra_value(job, 'override_dirname', None) or 'no overrides'})"


def _hydra_value(node: Any, key: str, default: Any) -> Any:
    """A value of Hydra's runtime config, or `default` where it is absent or still unset (`???`: a single run's
    job.num), which the config raises on."""
    try:
        return getattr(node, key)
    except Exception:  # noqa: BLE001 - AttributeError, or omegaconf's MissingMandatoryValue for ???
        return default


def failed_job_metric(sweeper_cfg: Any = None) -> float:
    """What a failed job returns: the worst value for the sweeper's `direction`, else NaN.

    sweeper_cfg defaults to the running job's hydra.sweeper.
    """
    if sweeper_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return math.nan
        sweeper_cfg = HydraConfig.get().sweeper
    direction = sweeper_cfg.get("direction")
    if not isinstance(direction, str) and direction is not None and len(direction) == 1:
        direction = direction[0]  # a one-objective list, as Optuna also accepts
    direction = str(direction).lower() if direction is not None else ""
    if direction in ("maximize", "studydirection.maximize"):
        return -math.inf
    if direction in ("minimize", "studydirection.minimize"):
        return math.inf
    return math.nan


def record_job_failure(run_dir: Path | None, err: BaseException, sweep_goes_on: bool = True) -> float:
    """Write the error of a failed sweep job into its run dir; return the job's metric (failed_job_metric).

    A user error (MoraTrainError) is recorded by its message, anything else with its traceback
    too (`run_dir` None: output_dir itself failed to resolve, so there is nowhere to record it). A run dir that
    already holds a finished run (metrics.json) is left untouched: the job
    failed precisely because it must not write there.
    """
    user_error = isinstance(err, MoraTrainError)
    message = str(err) if user_error else f"{type(err).__name__}: {err}"
    trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    if sweep_goes_on:
        print(
            f"\nmora-train: error in {_job_label()}: {message}\nthe sweep goes on with the next job",
            file=sys.stderr,
            flush=True,
        )
    metric = failed_job_metric()
    if run_dir is None:
        log.warning("could not resolve output_dir to record the error of %s", _job_label())
        return metric
    if (RunDir(run_dir).metrics).exists():
        log.warning("%s holds a finished run; its error is not recorded there", run_dir)
        return metric
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(
        RunDir(run_dir).error_json,
        {"error_type": type(err).__name__, "user_error": user_error, "message": message, "traceback": trace},
    )
    write_text_atomically(RunDir(run_dir).error_txt, message + "\n\n" + trace)
    return metric


def sweep_job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders of the jobs Hydra launched under sweep_dir (each holds .hydra/config.yaml)."""
    return sorted(p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/config.yaml"))


MULTIRUN_YAML = "multirun.yaml"  # what Hydra's basic sweeper writes into the sweep dir before any job
_started_sweep_dir: Path | None = None  # the sweep dir of the `mora-train -m` running in this process


def remove_refused_sweep_dir() -> None:
    """A sweep Hydra refused before its first job (a job's config did not compose) leaves no folder behind."""
    sweep_dir = _started_sweep_dir
    if sweep_dir is None or not sweep_dir.is_dir() or [p.name for p in sweep_dir.iterdir()] != [MULTIRUN_YAML]:
        return
    try:
        (sweep_dir / MULTIRUN_YAML).unlink()
        sweep_dir.rmdir()
    except OSError:
        pass


def unfinished_sweep_hint(argv: list[str]) -> str:
    """How to finish a sweep that SIGINT/SIGTERM stopped in one of its jobs (Hydra's basic launcher runs them one
    after another in this process, so the jobs after it never started): the same command, its sweep dir pinned."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(str(hydra_cfg.sweep.dir)).resolve()
    command = paste_command(argv, "hydra.sweep.dir", str(sweep_dir))
    return (
        f"The sweep stopped in job {_hydra_value(hydra_cfg.job, 'num', '?')}; the jobs after it never started. To "
        f"finish the sweep, run it again in the same sweep dir: {command}\nThere finished jobs are not run again "
        "(each is refused as a finished run), the stopped job resumes from its checkpoint and the others run"
    )


def sweep_started(sweep_dir: Path) -> None:
    """Remember the sweep dir of the `mora-train -m` running in this process (the CLI's sweep callback)."""
    global _started_sweep_dir
    _started_sweep_dir = Path(sweep_dir)


def read_error(run_dir: Path) -> dict[str, Any] | None:
    path = RunDir(run_dir).error_json
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"error_type": "unreadable", "message": f"{path} is not valid JSON", "user_error": False}

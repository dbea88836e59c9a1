"""What a failed `mora-train` job does, as one table: what failed x where the job ran -> action.

Every expected failure ends as one paragraph and an exit code, never a traceback; in a sweep (`-m`) a failed job
is recorded in its run dir (error.json, error.txt: mora_train.analysis.sweep) and the sweep goes on, unless the
user stopped it. What failed:

* rank 0 failed: a rank != 0 of a multi-process job, whose rank 0 has printed (and in a sweep recorded) the error;
* run error: a MoraTrainError (exit 2 and the codes in mora_train.core.errors, docs/errors.md);
* stop signal: a MoraTrainError of SIGINT/SIGTERM (exit code 128 + the signal);
* interrupted: Ctrl-C outside training, or a second one (outputs are renamed into place only when complete);
* bug: anything else (out of memory, a bug in one configuration...): one line and a traceback file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

from mora_train.analysis.sweep import (
    failed_job_metric,
    in_multirun,
    jobs_run_apart,
    record_job_failure,
    unfinished_sweep_hint,
)
from mora_train.config.overrides import shell_override
from mora_train.core.errors import EXIT_UNEXPECTED, EXIT_USER, MoraTrainError, report_unexpected
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import RunDirBusy
from mora_train.training.distributed import MainProcessFailed, is_main_process, rank

# Where the job ran: alone, in a sweep whose jobs share this process (Hydra's basic launcher: a stop signal
# stops the whole sweep), or in a sweep whose launcher gives each job a process of its own (submitit, Ray: a
# stop signal ends only that job, which must still hand its launcher a result).
ALONE, SWEEP, SWEEP_APART = "alone", "sweep", "sweep, a process per job"


def failure_kind(err: BaseException) -> str:
    if isinstance(err, MainProcessFailed):
        return "rank 0 failed"
    if isinstance(err, MoraTrainError):
        return "stop signal" if getattr(err, "exit_code", EXIT_USER) >= 128 else "run error"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return "bug"


def job_place() -> str:
    if not in_multirun():
        return ALONE
    return SWEEP_APART if jobs_run_apart() else SWEEP


def handle_failure(cfg: DictConfig, err: BaseException) -> float:
    """The action FAILURE_POLICY gives this failure: the sweeper's metric of a failed job, or an exit."""
    return FAILURE_POLICY[(failure_kind(err), job_place())](cfg, err)


# -- actions: each returns the failed job's metric to the sweeper, or exits ----------------------------------------


def follow_rank_0(cfg: DictConfig, err: BaseException) -> NoReturn:
    sys.exit(EXIT_USER)


def failed_metric(cfg: DictConfig, err: BaseException) -> float:
    return failed_job_metric()


def record_and_go_on(cfg: DictConfig, err: BaseException) -> float:
    """One bad job must not end the sweep: record it, go on."""
    return record_failure(cfg, err, sweep_goes_on=True)


def record_and_end_job(cfg: DictConfig, err: BaseException) -> float:
    return record_failure(cfg, err, sweep_goes_on=False)


def record_and_stop_sweep(cfg: DictConfig, err: BaseException) -> NoReturn:
    """The user stops the whole sweep; the job's record says so, and the message says how to finish it."""
    record_failure(cfg, err, sweep_goes_on=False)
    exit_with_error(cfg, err, after="\n" + unfinished_sweep_hint(sys.argv[1:]))


def exit_with_error(cfg: DictConfig, err: BaseException, after: str = "") -> NoReturn:
    logging.getLogger("mora_train").debug("user error", exc_info=err)
    where = "" if is_main_process() else f" (rank {rank()})"
    print(f"\nmora-train: error{where}: {err}{after}", file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", EXIT_USER))  # docs/errors.md lists the codes


def exit_interrupted(cfg: DictConfig, err: BaseException) -> NoReturn:
    run_dir = Path(cfg.output_dir)
    print(
        f"\nmora-train: interrupted; nothing half-written was left in place. Completed checkpoints in "
        f"{RunDir(run_dir).checkpoints} (if any) are kept: rerun with "
        f"{shell_override('output_dir', str(run_dir.resolve()))} to resume",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(130)


def exit_with_traceback_file(cfg: DictConfig, err: BaseException) -> NoReturn:
    report_unexpected("mora-train", err, Path(cfg.output_dir))
    sys.exit(EXIT_UNEXPECTED)


Action = Callable[[DictConfig, BaseException], float]

FAILURE_POLICY: dict[tuple[str, str], Action] = {
    ("rank 0 failed", ALONE): follow_rank_0,
    ("rank 0 failed", SWEEP): failed_metric,
    ("rank 0 failed", SWEEP_APART): failed_metric,
    ("run error", ALONE): exit_with_error,
    ("run error", SWEEP): record_and_go_on,
    ("run error", SWEEP_APART): record_and_go_on,
    ("stop signal", ALONE): exit_with_error,
    ("stop signal", SWEEP): record_and_stop_sweep,
    ("stop signal", SWEEP_APART): record_and_end_job,
    ("interrupted", ALONE): exit_interrupted,
    ("interrupted", SWEEP): exit_interrupted,
    ("interrupted", SWEEP_APART): exit_interrupted,
    ("bug", ALONE): exit_with_traceback_file,
    ("bug", SWEEP): record_and_go_on,
    ("bug", SWEEP_APART): record_and_go_on,
}


def record_failure(cfg: DictConfig, err: BaseException, sweep_goes_on: bool) -> float:
    """Write the job's error record; return the failed job's metric.

    Rank 0 alone writes the job's error record; the other ranks go on (or stop) with it. A job refused because
    another live run holds its dir writes nothing there: that folder is the other run's."""
    if not is_main_process() or isinstance(err, RunDirBusy):
        return failed_job_metric()
    try:
        run_dir: Path | None = Path(str(cfg.output_dir))
    except Exception:  # noqa: BLE001 - output_dir itself may be what failed to resolve
        run_dir = None
    try:  # the sweep report finds jobs by .hydra/config.yaml, which a refused job has not written yet
        if run_dir is not None:
            from mora_train.pipeline.run_config import write_hydra_records

            run_dir.mkdir(parents=True, exist_ok=True)
            write_hydra_records(run_dir, cfg)
    except OSError:
        pass
    return record_job_failure(run_dir, err, sweep_goes_on)

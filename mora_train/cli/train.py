"""`mora-train` command: Hydra composes the config, the pipeline does the work.

Returns the task's primary metric, so Hydra sweepers (e.g. Optuna) can optimise it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mora_train.cli.config_errors import hydra_error_problem, hydra_errors_raised, user_environment
from mora_train.config.overrides import open_mapping_overrides, parse_override
from mora_train.core.errors import EXIT_UNEXPECTED, EXIT_USER, report_unexpected
from mora_train.core.metrics import greater_is_better, primary_value, run_info, score, scores_of
from mora_train.core.run_dir import RunDir
from mora_train.training.distributed import (
    is_main_process,
    launch_time,
    prepare_cli,
    run_on_main_process,
    shutdown,
)


def register_launch_time_resolver() -> None:
    """`${launch_time:%Y-%m-%d}`: Hydra's `${now:...}`, but one instant shared by all ranks (and all patterns):
    training.distributed.launch_time, rank 0's clock.

    Cached in the config, as Hydra caches `${now:...}`: a launcher that runs the jobs of a sweep in other
    processes (submitit, Ray) hands them the sweep's config, and Hydra copies its resolver cache into each
    job's config, so every job resolves the sweep dir the parent created instead of its own start time.
    """
    OmegaConf.register_new_resolver(
        "launch_time", lambda pattern: launch_time().strftime(pattern), replace=True, use_cache=True
    )


# Available as soon as this module is imported: before Hydra composes configs/config.yaml, and in the job
# processes of a sweep launcher, which import this module to run the job.
register_launch_time_resolver()


def _run(cfg: DictConfig) -> float | None:
    """The job: every expected failure ends as one paragraph and an exit code, never a traceback.

    Expected failures are MoraTrainError (exit 2 and the codes in mora_train.core.errors); anything else is a
    bug: one line naming the error and the file holding its full traceback (in the run dir), exit 1. In a sweep
    a failed job is recorded and the sweep goes on (mora_train.cli.job_failures holds the whole policy).
    """
    from mora_train.pipeline.run_log import EarlyLog, detach_run_log

    root = logging.getLogger()
    root.addHandler(EarlyLog())  # held until the run dir may be written (pipeline.run_dir.prepare_run_dir)
    run_dir = Path(str(cfg.get("output_dir") or "."))
    was_absent_or_empty = not run_dir.is_dir() or not any(run_dir.iterdir())
    try:
        with user_environment():
            return _job(cfg)
    finally:
        detach_run_log()
        # A refused run leaves no trace: the (empty) folder Hydra created for it goes again.
        if was_absent_or_empty and run_dir.is_dir() and not any(run_dir.iterdir()):
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def _job(cfg: DictConfig) -> float | None:
    from mora_train.cli.job_failures import handle_failure
    from mora_train.pipeline.relaunch import run_relaunched, wants_relaunch
    from mora_train.pipeline.run_config import ComposedConfig
    from mora_train.pipeline.train import run

    composed = ComposedConfig(cfg)
    try:
        if cfg.get("mode", "train") == "eval":
            from mora_train.pipeline.evaluate import run_eval

            metrics = run_on_main_process(lambda: run_eval(composed))  # evaluation is a one-process job
        elif wants_relaunch(composed):  # accelerate.num_processes=N: this job as an N-process accelerate launch
            return score(run_relaunched(composed.read()))  # whose rank 0 has printed the summary
        else:
            metrics = run(composed)
    except (KeyboardInterrupt, Exception) as err:  # noqa: BLE001 - the CLI's last line: job_failures' table decides
        return handle_failure(cfg, err)
    # What a sweeper optimises: the task's primary metric signed so that higher is better (losses negated).
    objective = score(metrics)
    if is_main_process():
        print("\n" + summary_line(metrics, Path(cfg.output_dir)), flush=True)
    return objective


SHOW_ONLY_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def _override_values(argv: list[str]) -> dict[str, object]:
    """key -> value of the one-value overrides on the command line, as Hydra reads them (last one wins)."""
    values: dict[str, object] = {}
    for arg in argv:
        override = parse_override(arg)
        if override is not None and not override.is_sweep_override() and not override.is_delete():
            values[override.get_key_element().lstrip("+")] = override.value()
    return values


def precheck_output_dir(argv: list[str]) -> None:
    """Before Hydra creates the run dir (it makes output_dir=... its hydra.run.dir): refuse one that cannot be.

    With -m only an empty output_dir and hydra.sweep.dir are checked: each job's folder is made under the latter."""
    if any(a in SHOW_ONLY_FLAGS or a.startswith("--cfg=") for a in argv):
        return
    values = _override_values(argv)
    multirun = "-m" in argv or "--multirun" in argv
    keys = ("output_dir", "hydra.sweep.dir") if multirun else ("output_dir", "hydra.run.dir")
    from mora_train.config.output_dir import output_dir_problem

    for key in keys:
        if key not in values:
            continue
        value = values[key]
        if isinstance(value, str) and "${" in value:  # resolved by Hydra later
            continue
        if multirun and key == "output_dir" and value is not None and str(value).strip():
            continue
        problem = output_dir_problem(value if value is None else str(value), key)
        if problem:
            print(f"\nmora-train: error: {problem}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER)
        if key == "output_dir":
            return  # output_dir is the run dir; a hydra.run.dir beside it is not used


def summary_line(metrics: dict, run_dir: Path) -> str:
    """The run's closing lines: where its output is, the task's declared metric first, then its others."""
    primary = metrics["primary_metric"]
    value = primary_value(metrics)
    direction = "higher" if greater_is_better(metrics) else "lower"
    shown = [f"{primary}: {value:.4f} ({direction} is better)" if value is not None else f"{primary}: missing"]
    # A few of the task's other metrics (not its timings and counts), in the order the task reported them.
    # (scores_of also holds lm-evaluation-harness's, as lm_eval/TASK/METRIC, after the task's)
    others = [(k, v) for k, v in scores_of(metrics).items() if k != primary]
    shown += [f"{k}: {v:.4f}" for k, v in others[:3]]
    wall = f"wall time: {run_info(metrics, 'wall_time_s', 0.0):.0f} s"
    if metrics.get("mode") == "eval":
        where = f"evaluated: {metrics['evaluated']} on task {metrics['task']}"
        return f"{where}\n" + "   ".join([*shown, f"metrics: {RunDir(run_dir).metrics.resolve()}", wall])
    shown += [f"train_loss: {metrics['train_loss']:.4f}", f"merge_max_abs_diff: {metrics['merge_max_abs_diff']:.2e}"]
    return f"merged model: {RunDir(run_dir).merged.resolve()}\n" + "   ".join([*shown, wall]) + evaluation_line(metrics)


def evaluation_line(metrics: dict) -> str:
    """A third line for runs that evaluated while training: the best step, an early stop, the merged step."""
    best, loss = metrics.get("best_step"), metrics.get("best_eval_loss")
    if best is None or loss is None:
        return ""
    parts = [f"lowest eval_loss during training: {loss:.4f} at step {best}"]
    stopped = run_info(metrics, "early_stopped_at_step")
    if stopped is not None:
        parts.append(f"stopped early at step {stopped}")
    weights = run_info(metrics, "weights_step")
    if weights is not None:
        parts.append(f"merged model: step {weights}" + (" (the best)" if weights == best else ""))
    return "\n" + "   ".join(parts)


def main() -> None:
    argv = open_mapping_overrides(sys.argv[1:])
    precheck_output_dir(argv)
    # Under a multi-process launcher: join the process group and agree on the run dir before Hydra runs.
    register_launch_time_resolver()
    sys.argv = [sys.argv[0], *prepare_cli(argv)]
    try:
        with hydra_errors_raised() as reported_here:
            hydra.main(version_base=None, config_path="pkg://mora_train.configs", config_name="config")(_run)()
    except Exception as err:  # what Hydra raised before or after the job (the job reports its own)
        if not reported_here:
            raise  # HYDRA_FULL_ERROR=1 from the user: Hydra's full traceback, as Hydra documents
        _exit_on_hydra_error(err, argv)
    finally:
        shutdown()


def _exit_on_hydra_error(err: Exception, argv: list[str]) -> None:
    """A config Hydra refused: one paragraph and the fix, exit 2. Anything else is a bug: its traceback in a file."""
    from mora_train.analysis.sweep import remove_refused_sweep_dir

    problem = hydra_error_problem(err, argv)
    if problem is None:
        report_unexpected("mora-train", err, None)
        sys.exit(EXIT_UNEXPECTED)
    remove_refused_sweep_dir()  # a sweep refused before its first job leaves no folder behind
    print(f"\nmora-train: error: {problem}", file=sys.stderr, flush=True)
    sys.exit(problem.exit_code)


def eval_main() -> None:
    """`mora-train-eval ...`: the same as `mora-train mode=eval ...`."""
    sys.argv.insert(1, "mode=eval")
    main()


if __name__ == "__main__":
    main()

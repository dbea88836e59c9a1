"""`mora-train` command: Hydra composes the config, the pipeline does the work.

Returns the task's primary metric, so Hydra sweepers (e.g. Optuna) can optimise it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mora_train.training.distributed import MainProcessFailed, is_main_process, prepare_cli, rank, run_on_main_process, shutdown
from mora_train.core.errors import EXIT_UNEXPECTED, EXIT_USER, MoraTrainError, report_unexpected
from mora_train.core.metrics import METRICS_JSON, greater_is_better, metrics_of, primary_value, run_info, score


def _run(cfg: DictConfig) -> float | None:
    """The job: every expected failure ends as one paragraph and an exit code, never a traceback.

    Expected failures are MoraTrainError (exit 2 and the codes in mora_train.core.errors); anything else is a
    bug: one line naming the error and the file holding its full traceback (in the run dir), exit 1.
    """
    from mora_train.pipeline.train import EarlyLog, detach_run_log

    root = logging.getLogger()
    root.addHandler(EarlyLog())  # held until the run dir may be written (pipeline.train.prepare_run_dir)
    run_dir = Path(str(cfg.get("output_dir") or "."))
    was_absent_or_empty = not run_dir.is_dir() or not any(run_dir.iterdir())
    try:
        return _job(cfg)
    finally:
        detach_run_log()
        # A refused run leaves no trace: the (empty) folder Hydra created for it goes again.
        if was_absent_or_empty and run_dir.is_dir() and not any(run_dir.iterdir()):
            try:
                run_dir.rmdir()
            except OSError:
                pass


def _job(cfg: DictConfig) -> float | None:
    from mora_train.pipeline.train import run, write_hydra_records
    from mora_train.pipeline.relaunch import run_relaunched, wants_relaunch
    from mora_train.analysis.sweep import failed_job_metric, in_multirun, jobs_run_apart, record_job_failure

    def record_failure(err: BaseException, sweep_goes_on: bool = True) -> float:
        # Rank 0 alone writes the job's error record; the other ranks go on (or stop) with it.
        if not is_main_process():
            return failed_job_metric()
        try:  # the sweep report finds jobs by .hydra/config.yaml, which a refused job has not written yet
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            write_hydra_records(Path(cfg.output_dir), cfg)
        except OSError:
            pass
        return record_job_failure(cfg, err, sweep_goes_on)

    try:
        if cfg.get("mode", "train") == "eval":
            from mora_train.pipeline.evaluate import run_eval

            metrics = run_on_main_process(lambda: run_eval(cfg))  # evaluation is a one-process job
        elif wants_relaunch(cfg):  # accelerate.num_processes=N: this job as an N-process accelerate launch
            return score(run_relaunched(cfg))  # whose rank 0 has printed the summary
        else:
            metrics = run(cfg)
    except MainProcessFailed:
        # A rank != 0: rank 0 has printed (and in a sweep, recorded) the error; follow it.
        if in_multirun():
            return failed_job_metric()
        sys.exit(EXIT_USER)
    except MoraTrainError as err:
        if in_multirun():
            if getattr(err, "exit_code", EXIT_USER) < 128:  # one bad job must not end the sweep: record it, go on
                return record_failure(err)
            if jobs_run_apart():  # a job in a process of its own (submitit, Ray) stopped by a signal: only this job
                return record_failure(err, sweep_goes_on=False)
            # SIGINT/SIGTERM: the user stops the whole sweep; the job's record says so
            record_failure(err, sweep_goes_on=False)
        logging.getLogger("mora_train").debug("user error", exc_info=True)
        where = "" if is_main_process() else f" (rank {rank()})"
        print(f"\nmora-train: error{where}: {err}", file=sys.stderr, flush=True)
        sys.exit(getattr(err, "exit_code", EXIT_USER))  # README: "When things go wrong" lists the codes
    except KeyboardInterrupt:
        # Outside training, or a second Ctrl-C: stop now. Outputs are renamed into place only when complete.
        print(
            f"\nmora-train: interrupted; nothing half-written was left in place. Completed checkpoints in "
            f"{Path(cfg.output_dir, 'checkpoints')} (if any) are kept: rerun with output_dir={Path(cfg.output_dir).resolve()} "
            "to resume",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except Exception as err:
        if in_multirun():  # out of memory, a bug in one configuration...: recorded with its traceback
            return record_failure(err)
        report_unexpected("mora-train", err, Path(cfg.output_dir))
        sys.exit(EXIT_UNEXPECTED)
    # What a sweeper optimises: the task's primary metric signed so that higher is better (losses negated).
    objective = score(metrics)
    if not is_main_process():
        return objective
    print("\n" + summary_line(metrics, Path(cfg.output_dir)), flush=True)
    return objective


def _argv_value(argv: list[str], key: str) -> str | None:
    """The value of a `key=value` command-line override (last one wins), `+key=`/`++key=` included."""
    value = None
    for arg in argv:
        name, sep, rest = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = rest
    return value


def precheck_output_dir(argv: list[str]) -> None:
    """Before Hydra creates the run dir (it makes output_dir=... its hydra.run.dir): refuse one that cannot be."""
    if any(a in ("-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i") or a.startswith("--cfg")
           for a in argv):
        return
    output_dir = _argv_value(argv, "output_dir") or _argv_value(argv, "hydra.run.dir")
    if not output_dir or "${" in output_dir:
        return
    from mora_train.pipeline.train import output_dir_problem

    problem = output_dir_problem(output_dir.strip("'\""))
    if problem:
        print(f"\nmora-train: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)


def summary_line(metrics: dict, run_dir: Path) -> str:
    """The run's closing lines: where its output is, the task's declared metric first, then its others."""
    primary = metrics["primary_metric"]
    value = primary_value(metrics)
    direction = "higher" if greater_is_better(metrics) else "lower"
    shown = [f"{primary}: {value:.4f} ({direction} is better)" if value is not None else f"{primary}: missing"]
    # A few of the task's other metrics (not its timings and counts), in the order the task reported them.
    # (metrics_of also holds lm-evaluation-harness's, as lm_eval/TASK/METRIC, after the task's)
    others = [(k, v) for k, v in metrics_of(metrics).items() if k != primary and not k.endswith(("_s", "_samples", "_truncated"))]
    shown += [f"{k}: {v:.4f}" for k, v in others[:3]]
    wall = f"wall time: {run_info(metrics, 'wall_time_s', 0.0):.0f} s"
    if metrics.get("mode") == "eval":
        where = f"evaluated: {metrics['evaluated']} on task {metrics['task']}"
        return f"{where}\n" + "   ".join([*shown, f"metrics: {(run_dir / METRICS_JSON).resolve()}", wall])
    shown += [f"train_loss: {metrics['train_loss']:.4f}", f"merge_max_abs_diff: {metrics['merge_max_abs_diff']:.2e}"]
    return f"merged model: {(run_dir / 'merged').resolve()}\n" + "   ".join([*shown, wall])


def main() -> None:
    from mora_train.analysis.sweep import register_resolvers

    register_resolvers()  # before Hydra composes: the sweep subdir uses ${mora_dirname:...}
    precheck_output_dir(sys.argv[1:])
    # Under a multi-process launcher: join the process group and agree on the run dir before Hydra runs.
    sys.argv = [sys.argv[0], *prepare_cli(sys.argv[1:])]
    try:
        hydra.main(version_base=None, config_path="pkg://mora_train.configs", config_name="config")(_run)()
    finally:
        shutdown()


def eval_main() -> None:
    """`mora-train-eval ...`: the same as `mora-train mode=eval ...`."""
    sys.argv.insert(1, "mode=eval")
    main()


if __name__ == "__main__":
    main()

"""Experiment tracking: TensorBoard, Weights & Biases and MLflow, through transformers' own callbacks.

`logging.report_to` (configs/config.yaml) picks any of them. The Trainer's callbacks (TensorBoardCallback,
WandbCallback, MLflowCallback) stream the training log: loss, learning rate and gradient norm every
`trainer.logging_steps`. What those callbacks cannot know, this module adds, by opening the W&B and MLflow
runs itself before training (the callbacks then log into them) and closing them after the export:

* grouping: the jobs of one sweep (`mora-train -m`, whatever the launcher) share one W&B group and one
  MLflow experiment, named after the Hydra sweep dir (`logging.group` names it instead);
* the job: its Hydra overrides (less the keys `hydra.job.config.override_dirname.exclude_keys` leaves out of
  job dir names) as W&B tags and config and as MLflow params; the resolved config as W&B config and as the
  MLflow artifact resolved_config.yaml; the run is named after the run dir;
* the result: the final metrics of metrics.json (the task's, the training results, the merge check) as the
  W&B summary plus one last log entry, and as MLflow metrics, tags and the artifact metrics.json.

One tracking session per process at a time, as wandb.run and mlflow.active_run() are: `start` opens it on
the main process, `finish` logs the result and closes it, and `close` closes whatever a failed run left open
(a no-op when nothing is), so the next job of a sweep run in the same process starts clean. Nothing here
talks to a server unless the trackers are configured to: W&B honours WANDB_MODE=offline, MLflow writes to
a local store unless its tracking URI names a server.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mora_train.config.schema import Section, setting
from mora_train.core.errors import MoraTrainError
from mora_train.core.metrics import TRAINING_KEYS, metrics_of, run_info
from mora_train.core.run_dir import RunDir

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "mora-train"  # W&B project and MLflow experiment when nothing names them
MAX_GROUP = 128  # W&B refuses longer group names
MAX_TAG = 64  # W&B refuses longer tags
# logging.report_to: the trackers mora-train feeds, each with the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


# -- the `logging` section ------------------------------------------------------------------------------------


class WandbSettings(Section):
    project: str | None = setting(
        default=None, help="the W&B project; null: $WANDB_PROJECT, else mora-train (offline: WANDB_MODE=offline)"
    )
    entity: str | None = setting(
        default=None, help="the W&B entity (team or user); null: $WANDB_ENTITY, else your W&B default"
    )


class MlflowSettings(Section):
    tracking_uri: str | None = setting(
        default=None,
        help="the MLflow store; null: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)",
    )
    experiment: str | None = setting(
        default=None, help="the MLflow experiment; null: logging.group, else $MLFLOW_EXPERIMENT_NAME, else mora-train"
    )


class LoggingConfig(Section):
    """Experiment trackers (docs/sweeps.md, "Experiment tracking"): logging.report_to=[tensorboard,wandb,mlflow]."""

    report_to: list[str] | str | None = setting(
        factory=lambda: ["tensorboard"],
        help='any of tensorboard, wandb, mlflow: a list, one name or "a,b"; [] or none for none',
    )
    group: str | None = setting(
        default=None,
        help="the W&B group and MLflow experiment; null: a sweep job's is its sweep dir, a single run has none",
    )
    wandb: WandbSettings = setting(factory=WandbSettings, help="Weights & Biases settings")
    mlflow: MlflowSettings = setting(factory=MlflowSettings, help="MLflow settings")

    @property
    def trackers(self) -> list[str]:
        """`report_to` as a list of names, each once in the order given."""
        return tracker_names(self.report_to)

    def check(self, prefix: str) -> list[str]:
        """Known trackers only, each one installed."""
        problems = []
        for name in self.trackers:
            if name not in TRACKERS:
                problems.append(
                    f"`{prefix}.report_to` names {name!r}, which is not a tracker mora-train feeds; use any of "
                    f"{', '.join(TRACKERS)} (e.g. {prefix}.report_to=[tensorboard,wandb]), or {prefix}.report_to=[] "
                    "for none"
                )
            elif importlib.util.find_spec(TRACKERS[name]) is None:
                problems.append(
                    f"`{prefix}.report_to` includes {name}, whose package is not installed: pip install "
                    f"'mora-train[{name}]' (or pip install {TRACKERS[name]}), or drop {name} from {prefix}.report_to"
                )
        return problems


def tracker_names(report_to: list[str] | str | None) -> list[str]:
    """`logging.report_to` as a list of names: a list, one name or "a,b"; null, [] and none mean none."""
    if report_to is None:
        return []
    items = report_to.split(",") if isinstance(report_to, str) else [str(item) for item in report_to]
    names = [item.strip() for item in items if item.strip() and item.strip().lower() != "none"]
    return list(dict.fromkeys(names))  # once each, in the order given


def trackers(logging: LoggingConfig | None) -> list[str]:
    """The trackers `logging.report_to` picks (no logging section: the default, TensorBoard)."""
    return (logging or LoggingConfig()).trackers


def trainer_callbacks(logging: LoggingConfig | None, run_dir: Path) -> list[Any]:
    """transformers' own callbacks for the chosen trackers; TensorBoard writes into RUN_DIR/tensorboard."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    names = trackers(logging)
    callbacks: list[Any] = []
    if "tensorboard" in names:
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(RunDir(run_dir).tensorboard)
        callbacks.append(tensorboard)
    if "wandb" in names:
        callbacks.append(WandbCallback())  # logs into the run `start` opened
    if "mlflow" in names:
        callbacks.append(MLflowCallback())  # finds the run `start` opened active, and leaves it open
    return callbacks


# -- which job this is ------------------------------------------------------------------------------------


@dataclass
class Job:
    """Who the tracked run is: its name, its sweep (group) and its overrides."""

    name: str
    group: str | None = None
    sweep_dir: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)


def group_name(sweep_dir: str) -> str:
    """A sweep dir as a W&B group / MLflow experiment name: the path as Hydra resolved it, its last 128 characters."""
    name = str(sweep_dir).rstrip("/")
    return name[-MAX_GROUP:]


def parse_overrides(overrides: list[str], exclude: set[str]) -> dict[str, str]:
    """`key=value` command-line overrides as {key: value} (`+`/`++` dropped), less the excluded keys."""
    parsed = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if sep and key not in exclude:
            parsed[key] = value
    return parsed


def current_job(logging: LoggingConfig | None, run_dir: Path) -> Job:
    """This job as Hydra launched it (under any launcher: the sweep dir travels with the job's config)."""
    job = Job(name=Path(run_dir).name)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    except ImportError:  # pragma: no cover - hydra is a dependency
        hydra_cfg = None
    if hydra_cfg is not None:
        exclude = set(getattr(hydra_cfg.job.config.override_dirname, "exclude_keys", None) or [])
        job.overrides = parse_overrides(list(hydra_cfg.overrides.task), exclude)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            job.sweep_dir = str(hydra_cfg.sweep.dir)
    group = logging.group if logging is not None else None
    job.group = group_name(group) if group else group_name(job.sweep_dir) if job.sweep_dir else None
    return job


# -- the session --------------------------------------------------------------------------------------------


@dataclass
class Session:
    job: Job
    wandb_run: Any = None
    mlflow_run_id: str | None = None


_session: Session | None = None


def start(logging: LoggingConfig, config: dict[str, Any], run_dir: Path) -> None:
    """Open this job's W&B and MLflow runs (those `logging.report_to` names); main process only.

    `config`: the run's whole resolved config as plain values (W&B config, MLflow's resolved_config.yaml)."""
    close(failed=True)  # whatever an earlier job of this process left open
    names = trackers(logging)
    if "wandb" not in names and "mlflow" not in names:
        return
    global _session
    session = _session = Session(job=current_job(logging, run_dir))
    if "wandb" in names:
        session.wandb_run = _start_wandb(session.job, config, logging.wandb, Path(run_dir))
    if "mlflow" in names:
        session.mlflow_run_id = _start_mlflow(session.job, config, logging.mlflow, Path(run_dir))


def _start_wandb(job: Job, config: dict, settings: WandbSettings, run_dir: Path) -> Any:
    import wandb

    project = settings.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    try:
        return wandb.init(
            project=project,
            entity=settings.entity,  # None: WANDB_ENTITY or the account's default
            group=job.group,
            name=job.name,
            job_type="train",
            tags=[f"{key}={value}"[:MAX_TAG] for key, value in job.overrides.items()],
            config={**config, "overrides": job.overrides},
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),  # RUN_DIR/wandb/ unless WANDB_DIR says
            settings=wandb.Settings(console="off"),  # the console log is in train.log already
        )
    except Exception as err:
        raise MoraTrainError(
            f"could not start the Weights & Biases run ({type(err).__name__}: {err}); log in with `wandb login` "
            "(or set WANDB_API_KEY), run offline with WANDB_MODE=offline, or drop wandb from logging.report_to"
        ) from err


def _start_mlflow(job: Job, config: dict, settings: MlflowSettings, run_dir: Path) -> str:
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    try:
        if settings.tracking_uri:
            mlflow.set_tracking_uri(settings.tracking_uri)
        experiment = settings.experiment or job.group or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        mlflow.set_experiment(experiment)
        tags = {"mora_train.run_dir": str(run_dir.resolve())}
        if job.sweep_dir:
            tags["mora_train.sweep_dir"] = job.sweep_dir
        run = mlflow.start_run(run_name=job.name, tags=tags)
        if job.overrides:
            mlflow.log_params({key: value[:MAX_PARAM_VAL_LENGTH] for key, value in job.overrides.items()})
        mlflow.log_dict(config, RunDir.RESOLVED_CONFIG)
        return run.info.run_id
    except Exception as err:
        raise MoraTrainError(
            f"could not start the MLflow run in {mlflow.get_tracking_uri()} ({type(err).__name__}: {err}); point "
            "logging.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) at a reachable server or a local store such as "
            "sqlite:///mlflow.db, or drop mlflow from logging.report_to"
        ) from err


def final_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.json record worth a tracker: the task's metrics, the training results and
    the merge check as merge_check_passed (1 or 0)."""
    numbers = dict(metrics_of(record))
    for key in TRAINING_KEYS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = float(value)
    check = run_info(record, "merge_check")
    if check is not None:
        numbers["merge_check_passed"] = 1.0 if check == "passed" else 0.0
    return numbers


def finish(record: dict[str, Any]) -> None:
    """Log the run's final metrics (its metrics.json record) to the open runs, then close them.

    A tracker that fails here only warns: the run itself is complete and metrics.json holds its results."""
    session = _session
    if session is None:
        return
    numbers = final_metrics(record)
    labels = {"merge_check": str(run_info(record, "merge_check")), "primary_metric": str(record.get("primary_metric"))}
    step = record.get("train_steps")
    try:
        if session.wandb_run is not None:
            session.wandb_run.log({**numbers, "train/global_step": step})
            session.wandb_run.summary.update({**numbers, **labels})
        if session.mlflow_run_id is not None:
            import mlflow

            # MLflow names allow letters, digits and _-. :/ only (lm-eval's "exact_match,strict-match" has a comma)
            mlflow.log_metrics(
                {re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k): v for k, v in numbers.items()},
                step=step if isinstance(step, int) else None,
            )
            mlflow.set_tags(labels)
            mlflow.log_dict(record, RunDir.METRICS)
    except Exception as err:  # noqa: BLE001 - any tracker failure: the run is complete and metrics.json holds it
        log.warning(
            "could not log the final metrics to the trackers (%s: %s); metrics.json holds them", type(err).__name__, err
        )
    close(failed=run_info(record, "merge_check") == "failed")


def close(failed: bool = False) -> None:
    """End the open W&B / MLflow runs (failed: marked so); a no-op when none is open. Never raises."""
    global _session
    session, _session = _session, None
    if session is None:
        return
    if session.wandb_run is not None:
        try:
            session.wandb_run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # noqa: BLE001 - closing never raises (it runs on failure paths too)
            log.warning("could not close the W&B run (%s: %s)", type(err).__name__, err)
    if session.mlflow_run_id is not None:
        try:
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == session.mlflow_run_id:
                mlflow.end_run(status="FAILED" if failed else "FINISHED")
        except Exception as err:  # noqa: BLE001 - closing never raises (it runs on failure paths too)
            log.warning("could not close the MLflow run (%s: %s)", type(err).__name__, err)

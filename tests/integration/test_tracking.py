"""Experiment tracking (logging.report_to): W&B offline and MLflow in a local store, fed by one 2-job sweep
that also evaluates while training (eval_loss and generated samples reach every tracker).

The sweep runs with no network at all: W&B in offline mode, MLflow in a sqlite file, MLflow telemetry off,
and a sitecustomize that refuses (and records) any connection to a non-local address. What the trackers
hold is read back with their own readers (`wandb leet inspect`, MlflowClient) and compared with each
job's metrics.json and log_history.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mora_train.core.errors import ConfigError
from mora_train.training import tracking
from tests.conftest import compose_config, compose_run, run_cli
from tests.conftest import validate_config as validate

pytest.importorskip("wandb", reason="wandb not installed (scripts/setup.sh installs it: pip install -e '.[wandb]')")
pytest.importorskip("mlflow", reason="mlflow not installed (scripts/setup.sh installs it: pip install -e '.[mlflow]')")

FAST_JOB = [
    "model=tiny-llama",
    "task.num_pairs=8",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=8",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.lr_scheduler=constant",
    "trainer.save_steps=0",
    "task.eval.max_samples=4",
    # evaluation while training: eval_loss and generated samples reach every tracker too
    "task.val_size=2",
    "trainer.eval_steps=2",
    "trainer.sample_every=2",
    "trainer.num_samples=1",
]

NO_NETWORK = """
# Test-only: refuse, and record in $MORA_TEST_NETWORK_LOG, every connection to a non-local address.
import os, socket
_log, _local = os.environ["MORA_TEST_NETWORK_LOG"], {"localhost", "127.0.0.1", "::1", "", socket.gethostname()}
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def _refuse(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
    raise OSError("network access refused by the test: " + what)
def _remote(address):
    return isinstance(address, tuple) and not (str(address[0]) in _local or str(address[0]).startswith("127."))
def connect(self, address):
    return _refuse(f"connect {address}") if _remote(address) else _connect(self, address)
def connect_ex(self, address):
    return _refuse(f"connect {address}") if _remote(address) else _connect_ex(self, address)
def getaddrinfo(host, *args, **kwargs):
    if _remote((host,)) and host is not None:
        return _refuse(f"getaddrinfo {host}")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


def offline_env(root: Path) -> dict[str, str]:
    guard = root / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "MORA_TEST_NETWORK_LOG": str(root / "network.log"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH", "")) if p),
    }


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory: pytest.TempPathFactory):
    """`mora-train -m adapter=lora,mora` on the tiny model, reporting to TensorBoard, W&B and MLflow."""
    root = tmp_path_factory.mktemp("tracked")
    (root / "wandb").mkdir()
    sweep_dir = root / "sweep"
    env = offline_env(root)
    result = run_cli(
        [
            "-m",
            "adapter=lora,mora",
            "rank=2",
            *FAST_JOB,
            "logging.report_to=[tensorboard,wandb,mlflow]",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=root,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all((job / "metrics.json").is_file() for job in jobs)
    return root, sweep_dir, jobs, env


def logged_losses(job: Path, key: str = "loss") -> dict[int, float]:
    return {h["step"]: h[key] for h in json.loads((job / "log_history.json").read_text()) if key in h}


def wandb_inspect(run_path: Path, env: dict[str, str], *flags: str) -> str:
    """wandb's own reader of an offline run's transaction log (run-ID.wandb)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    result = subprocess.run(
        [str(wandb_cli), "leet", "inspect", *flags, str(run_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, f"`wandb leet inspect` (wandb >= 0.31) failed: {result.stderr[-2000:]}"
    return result.stdout


def test_wandb_offline_runs_hold_the_sweep_group_overrides_training_log_and_final_metrics(tracked_sweep) -> None:
    root, sweep_dir, jobs, env = tracked_sweep
    runs = sorted((root / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, "one W&B run per job, under WANDB_DIR"
    seen = set()
    for run_path in runs:
        summary = json.loads(wandb_inspect(run_path, env, "--summary", "--json"))
        records = [json.loads(line) for line in wandb_inspect(run_path, env, "--json").splitlines() if line.strip()]
        (run_record,) = [r["run"] for r in records if r.get("type") == "run"]
        job = sweep_dir / summary["name"]
        assert job in jobs and summary["state"] == "finished" and summary["project"] == "mora-train"
        seen.add(job)
        assert run_record["run_group"] == str(sweep_dir)  # one group per sweep
        metrics = json.loads((job / "metrics.json").read_text())
        adapter = metrics["adapter"]
        assert f"adapter={adapter}" in summary["tags"] and "rank=2" in summary["tags"]
        assert summary["config"]["overrides"]["adapter"] == adapter and summary["config"]["rank"] == 2
        # the training log, step by step, as log_history.json has it
        history = {}
        for record in records:
            if record.get("type") == "history":
                items = record["history"]["item"]  # one logged row: {"train/loss": ..., "train/global_step": ...}
                if "train/loss" in items:
                    history[items["train/global_step"]] = items["train/loss"]
        assert history == pytest.approx(logged_losses(job))
        # evaluation while training: eval_loss at every trainer.eval_steps, the samples as a table each time
        evals = {
            record["history"]["item"]["train/global_step"]: record["history"]["item"]["eval/loss"]
            for record in records
            if record.get("type") == "history" and "eval/loss" in record["history"]["item"]
        }
        assert list(evals) == [2, 4] and evals == pytest.approx(logged_losses(job, "eval_loss"))
        tables = sorted((run_path / "files" / "media" / "table").glob("samples_*.table.json"))
        assert len(tables) == 2, "one samples table per trainer.sample_every"
        for table in tables:
            content = json.loads(table.read_text())
            assert content["columns"] == ["prompt", "generated", "reference"] and len(content["data"]) == 1
            assert content["data"][0][0].startswith("Key: ")
        # the final metrics and the merge check, as metrics.json has them
        final = summary["summary"]
        assert final["char_accuracy"] == pytest.approx(metrics["char_accuracy"])
        assert final["exact_match"] == pytest.approx(metrics["exact_match"])
        assert final["merge_max_abs_diff"] == pytest.approx(metrics["merge_max_abs_diff"])
        assert final["merge_check"] == "passed" and final["merge_check_passed"] == 1
        assert final["primary_metric"] == "char_accuracy" and final["train_steps"] == 4
        assert final["best_eval_loss"] == pytest.approx(metrics["best_eval_loss"]) and final["best_step"] >= 2
    assert seen == set(jobs)


def test_mlflow_has_one_experiment_per_sweep_with_params_training_log_and_final_metrics(tracked_sweep) -> None:
    from mlflow.tracking import MlflowClient

    _root, sweep_dir, jobs, env = tracked_sweep
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(str(sweep_dir))
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [job.name for job in jobs]
    for run in runs:
        job = sweep_dir / run.info.run_name
        metrics = json.loads((job / "metrics.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.params["adapter"] == metrics["adapter"] and run.data.params["rank"] == "2"
        assert run.data.params["trainer.max_steps"] == "4"
        assert run.data.tags["mora_train.sweep_dir"] == str(sweep_dir) and run.data.tags["merge_check"] == "passed"
        losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        assert losses == pytest.approx(logged_losses(job))
        evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
        assert list(evals) == [2, 4] and evals == pytest.approx(logged_losses(job, "eval_loss"))
        samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
        assert samples == {"samples/step-000002.md", "samples/step-000004.md"}
        for key in ("char_accuracy", "exact_match", "merge_max_abs_diff", "train_loss", "best_eval_loss"):
            assert run.data.metrics[key] == pytest.approx(metrics[key]), key
        assert run.data.metrics["merge_check_passed"] == 1.0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "resolved_config.yaml"} <= artifacts


def test_tracked_runs_keep_tensorboard_and_never_touch_the_network(tracked_sweep) -> None:
    root, _sweep_dir, jobs, _env = tracked_sweep
    for job in jobs:
        assert list((job / "tensorboard").iterdir()), "no TensorBoard events"
        assert not (job / "wandb").exists(), "WANDB_DIR was set: W&B writes there, not into the run dir"
    log = root / "network.log"
    assert not log.exists() or log.read_text() == "", f"network access attempted:\n{log.read_text()}"


# -- config: default, validation ------------------------------------------------------------------------------


def test_default_is_tensorboard_into_the_run_dir_as_before(tmp_path: Path) -> None:
    from transformers.integrations import TensorBoardCallback

    run = compose_run(["model=tiny-llama"], tmp_path)
    assert run.logging == tracking.LoggingConfig()  # config.yaml restates the section's defaults
    assert run.logging.trackers == ["tensorboard"]
    (callback,) = tracking.trainer_callbacks(run.logging, tmp_path)
    assert isinstance(callback, TensorBoardCallback) and callback.logging_dir == str(tmp_path / "tensorboard")
    assert [type(c).__name__ for c in tracking.trainer_callbacks(None, tmp_path)] == ["TensorBoardCallback"]
    assert tracking.trainer_callbacks(compose_run(["logging.report_to=[]"], tmp_path).logging, tmp_path) == []
    # One name, "a,b" and a list all work; none and repeats drop out.
    assert tracking.trackers(compose_run(["logging.report_to=wandb"], tmp_path).logging) == ["wandb"]
    assert tracking.trackers(compose_run(["logging.report_to='mlflow,wandb'"], tmp_path).logging) == ["mlflow", "wandb"]
    assert tracking.tracker_names(["wandb", "none", "wandb"]) == ["wandb"] and tracking.tracker_names(None) == []


def test_unknown_or_missing_trackers_are_config_problems_naming_key_and_fix(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as info:
        validate(
            compose_config(
                [
                    "model=tiny-llama",
                    "logging.report_to=[wandb,neptune,mlflow]",
                    "trainer.max_steps=0",
                    "trainer.num_epochs=0",
                ],
                tmp_path,
            )
        )
    problems = info.value.problems
    assert any("logging.report_to" in p and "'neptune'" in p and "tensorboard, wandb, mlflow" in p for p in problems)
    assert any("logging.report_to" in p and "mlflow" in p and "pip install 'mora-train[mlflow]'" in p for p in problems)
    assert any("trainer.max_steps" in p for p in problems)  # listed with every other problem, at once
    assert not any("wandb" in p and "not installed" in p for p in problems)

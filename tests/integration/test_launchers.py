"""Sweeps through Hydra's submitit launcher (hydra/launcher=local|slurm) behave as sweeps through the basic one.

`hydra/launcher=local` runs every job in a fresh Python process, from a pickled call, exactly as the SLURM
executor does on a cluster node: the job's config (custom resolvers included) must resolve to the same sweep
dir as the parent's, the report must find the jobs next to submitit's own `.submitit/` folder, and the trackers
must group them by that sweep dir. `accelerate.num_processes=N` makes a job an N-process accelerate launch
of itself (CPU processes here, GPUs on a SLURM node).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mora_train.cli.report import main as report_main
from tests.conftest import CONFIG_DIR

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason="hydra-submitit-launcher not installed (scripts/setup.sh installs it: pip install -e '.[slurm]')",
)

FAST_JOB = [
    "model=tiny-llama",
    "task.num_pairs=8",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.lr_scheduler=constant",
    "trainer.save_steps=0",
    "task.eval.max_samples=4",
]


def launch(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, subprocess.CompletedProcess]:
    """`python -m mora_train ARGS`; returns the parent's PID with the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "mora_train", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=600)
    return process.pid, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def report_rows(sweep_dir: Path) -> list[dict[str, str]]:
    assert report_main([str(sweep_dir), "--no-spectrum"]) == 0  # mora-train-report SWEEP_DIR --no-spectrum
    with (sweep_dir / "report.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.multiprocess  # the two jobs run side by side, each in its own process
def test_local_submitit_sweep_runs_each_job_in_its_own_process_and_reports_like_any_sweep(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    # No hydra.sweep.dir: the dated default, ${launch_time:...}, which each job's process must resolve as the
    # parent did (seconds later). W&B offline: the jobs' runs must share one group, the sweep dir.
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    parent_pid, result = launch(
        ["-m", "hydra/launcher=local", "adapter=lora", "rank=2,4", *FAST_JOB, "logging.report_to=[tensorboard,wandb]"],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]  # one sweep dir, no stray ones
    assert f"2 of 2 jobs succeeded in {sweep_dir.relative_to(tmp_path)}" in result.stdout
    jobs = job_dirs(sweep_dir)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]

    # Two processes: submitit's job ids (the local executor's are the jobs' PIDs), each with its own log.
    ids = []
    for job in jobs:
        hydra_record = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        job_id = str(hydra_record["job"]["id"])
        log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={job_id}," in log and "merged model:" in log
        assert (job / "metrics.json").is_file() and list((job / "tensorboard").iterdir())
        ids.append(int(job_id))
    assert len(set(ids)) == 2 and parent_pid not in ids

    rows = report_rows(sweep_dir)
    assert sorted((r["adapter"], r["rank"], r["status"]) for r in rows) == [("lora", "2", "ok"), ("lora", "4", "ok")]
    assert all(not r["run"].startswith(".submitit") for r in rows)

    groups = set()
    for run in (tmp_path / "wandb").glob("offline-run-*"):
        inspect = subprocess.run(
            [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(run)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert inspect.returncode == 0, inspect.stderr[-2000:]
        groups |= {
            json.loads(line)["run"]["run_group"]
            for line in inspect.stdout.splitlines()
            if line.strip() and json.loads(line).get("type") == "run"
        }
    assert groups == {str(sweep_dir.relative_to(tmp_path))}


FAKE_SLURM = Path(__file__).resolve().parents[1] / "support" / "fake_slurm"


@pytest.mark.multiprocess  # one job is a 2-process accelerate launch
def test_slurm_sweep_goes_through_sbatch_and_a_job_can_be_a_multi_process_accelerate_launch(tmp_path: Path) -> None:
    """hydra/launcher=slurm against a stand-in for sbatch/srun/sacct (tests/support/fake_slurm): the launcher's
    keys reach the sbatch script, the jobs run as a SLURM job array (job ids ARRAY_TASK), and the job with
    accelerate.num_processes=2 runs as a 2-process accelerate launch (CPU processes here; GPUs on a node)."""
    sweep_dir, slurm_state = tmp_path / "sweep", tmp_path / "slurm"
    env = {
        "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(slurm_state),
        "FAKE_SLURM_PYTHON": sys.executable,
    }
    _pid, result = launch(
        [
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj42",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.timeout_min=30",
            "accelerate.num_processes=1,2",
            "adapter=lora",
            "rank=2",
            *FAST_JOB,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 of 2 jobs succeeded in {sweep_dir}" in result.stdout
    (sbatch,) = slurm_state.glob("sbatch-*.txt")
    script = sbatch.read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --time=30",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --job-name=mora-train",
        "#SBATCH --array=0-1%2",
    ):
        assert line in script, f"{line} not in the sbatch script:\n{script}"
    array_id = sbatch.stem.split("-")[1]

    one, two = job_dirs(sweep_dir)  # job 0: accelerate.num_processes=1, job 1: =2
    hydra_record = yaml.safe_load((one / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert str(hydra_record["job"]["id"]) == f"{array_id}_0"  # the SLURM array task it ran as
    assert json.loads((one / "metrics.json").read_text())["run"]["world_size"] == 1
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["run"]["world_size"] == 2 and metrics["run"]["engine"] == "ddp"
    assert len(set(metrics["run"]["replica_checksums"])) == 1  # the two replicas ended equal
    log = (sweep_dir / ".submitit" / f"{array_id}_1" / f"{array_id}_1_0_log.out").read_text()
    assert "running this job as 2 processes" in log and "accelerate.commands.launch" in log
    assert f"logging.group='{sweep_dir}'" in log  # the launched single run is tracked in the sweep's group

    rows = report_rows(sweep_dir)
    assert [(r["adapter"], r["rank"], r["status"]) for r in rows] == [("lora", "2", "ok")] * 2


# -- accelerate.num_processes: the command, the checks, the error read back (no process started) -----------------


@pytest.fixture
def job_config(tmp_path: Path):
    """A composed job config with Hydra's own config set, as inside a job (reset afterwards)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / "sweep" / "0_adapter=lora,rank=8")
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_relaunch_command_carries_the_job_and_its_topology(job_config, monkeypatch) -> None:
    from mora_train.pipeline import relaunch
    from mora_train.pipeline.run_config import ComposedConfig

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = job_config(
        "accelerate.num_processes=4",
        "adapter=lora",
        "rank=8",
        "logging.report_to=[wandb]",
        'accelerate.args=["--gpu_ids","0,1,2,3"]',
    )
    assert relaunch.wants_relaunch(ComposedConfig(cfg))
    run_dir = Path(cfg.output_dir)
    config = ComposedConfig(cfg).read()
    gpu = relaunch.accelerate_command(config, run_dir, cuda=True)
    launch_args = gpu[: gpu.index("mora_train")]
    assert launch_args[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" not in launch_args
    assert launch_args[launch_args.index("--config_file") + 1].endswith("distributed/accelerate/multi_gpu.json")
    assert launch_args[launch_args.index("--num_processes") + 1] == "4" and "--gpu_ids" in launch_args
    job = gpu[gpu.index("mora_train") + 1 :]
    assert {"adapter=lora", "rank=8", f"output_dir='{run_dir}'"} <= set(job)  # quoted: the dir holds '=' and ','
    assert not any(a.startswith("logging.group") for a in job)  # a single run: no sweep to group by
    cpu = relaunch.accelerate_command(config, run_dir, cuda=False)
    assert "--multi_gpu" in cpu and "--config_file" not in cpu[: cpu.index("mora_train")]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not relaunch.wants_relaunch(ComposedConfig(cfg))  # inside the launched processes: run as usual


def test_relaunch_refuses_several_nodes_and_bad_settings(job_config, monkeypatch) -> None:
    from mora_train.core.errors import MoraTrainError
    from mora_train.pipeline import relaunch
    from mora_train.pipeline.run_config import ComposedConfig

    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    with pytest.raises(MoraTrainError, match=re.escape("hydra.launcher.nodes=1")):
        relaunch.run_relaunched(ComposedConfig(job_config("accelerate.num_processes=8")).read())
    _, problems = ComposedConfig(
        job_config("accelerate.num_processes=0", "accelerate.args=--gpu_ids")
    ).read_with_problems()
    assert any("accelerate.num_processes=0" in p for p in problems) and any("accelerate.args" in p for p in problems)


def test_a_failed_launch_is_read_as_the_run_s_error_and_exit_status() -> None:
    from mora_train.pipeline.relaunch import LaunchOutput

    output = LaunchOutput()
    for line in [
        "loading...\n",
        "mora-train: error: invalid configuration (1 problem):\n",
        "  - `trainer.batch_size=8` is not a multiple of ...\n",
        "E1130 torchrun: failed\n",
        "  exitcode  : -15 (pid: 1)\n",
        "Root Cause (first observed failure):\n",
        "  exitcode  : 2 (pid: 2)\n",
    ]:
        output.read(line)
    assert output.exit_code(1) == 2
    assert output.reason() == "invalid configuration (1 problem):\n  - `trainer.batch_size=8` is not a multiple of ..."
    assert LaunchOutput().exit_code(143) == 143 and LaunchOutput().reason() == "no error output"


def test_only_the_basic_launcher_lets_a_stopped_job_end_the_sweep(job_config) -> None:
    """With a launcher that runs each job in its own process, a job stopped by a signal returns a failed
    result (the others go on, the summary is printed); with Hydra's basic launcher it stops the sweep."""
    from mora_train.analysis.sweep import jobs_run_apart

    job_config()
    assert not jobs_run_apart()
    for launcher in ("local", "slurm", "submitit_local"):
        job_config(f"hydra/launcher={launcher}")
        assert jobs_run_apart(), launcher

"""A job as an N-process `accelerate launch` of itself: `accelerate.num_processes=N`.

Hydra runs a job's function in one process: the CLI's own, or under a launcher plugin a fresh one per job
(submitit: one per SLURM job of the array, on its node). A job that should train on the N GPUs of its node
starts, from that process, `accelerate launch --num_processes N -m mora_train <the job's overrides>
output_dir=<the job's run dir>` and waits for it: the N processes are an ordinary multi-process run
(docs/distributed.md, "Multi-GPU and multi-node training": rank 0 writes the run dir, the engine is
`distributed=`), writing into the job's run dir. This process then reads the run's metrics.json and returns it
as the job's result, so the sweep's summary, `mora-train-report` and sweepers see the job like any other; a
failed launch is the job's error (exit status and the run's error paragraph), recorded as any failed job is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from mora_train.configs import CONFIG_DIR
from mora_train.core.errors import MoraTrainError, RunStopped
from mora_train.core.run_dir import RunDir
from mora_train.pipeline.run_config import ComposedConfig, RunConfig
from mora_train.training import distributed, tracking

ACCELERATE_CONFIGS = CONFIG_DIR / "distributed" / "accelerate"
# A bare `accelerate launch` flag set for N processes on this machine (as scripts/launch.sh --gpus N / --cpu N);
# port 0: a free port, so several jobs can share a node.
GPU_TOPOLOGY = ["--config_file", str(ACCELERATE_CONFIGS / "multi_gpu.json")]
CPU_TOPOLOGY = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def wants_relaunch(composed: ComposedConfig) -> bool:
    """accelerate.num_processes > 1, and this process is not one of a multi-process launch already."""
    launched = "LOCAL_RANK" in os.environ or distributed.world_size() > 1
    return not launched and composed.read().accelerate.num_processes > 1


def quoted(value: str | Path) -> str:
    """A Hydra override value that stays one string whatever it holds (job dirs hold '=' and ',')."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_arguments(config: RunConfig, run_dir: Path) -> list[str]:
    """mora-train's arguments that run this job again: its config, its overrides, its run dir, its group."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    args: list[str] = []
    if hydra_cfg.job.config_name and hydra_cfg.job.config_name != "config":
        args += ["--config-name", hydra_cfg.job.config_name]
    # --config-dir (a command-line config source) and hydra.searchpath: the same config search path
    searchpath = [f"{s.schema}://{s.path}" for s in hydra_cfg.runtime.config_sources if s.provider == "command-line"]
    searchpath += [str(p) for p in hydra_cfg.searchpath]
    if searchpath:
        args.append("hydra.searchpath=[" + ",".join(quoted(p) for p in searchpath) + "]")
    args += [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "output_dir"]
    args.append(f"output_dir={quoted(run_dir)}")
    if not config.logging.group:
        group = tracking.current_job(config.logging, run_dir).group  # the sweep's: the launched run is a single run
        if group:
            args.append(f"logging.group={quoted(group)}")
    return args


def accelerate_command(config: RunConfig, run_dir: Path, cuda: bool | None = None) -> list[str]:
    """`accelerate launch` of this job on num_processes GPUs (CPU processes where there is no GPU)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    extra = list(config.accelerate.args)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(GPU_TOPOLOGY if cuda else CPU_TOPOLOGY),
        "--num_processes",
        str(config.accelerate.num_processes),
        "--main_process_port",
        "0",
        *extra,
        "-m",
        "mora_train",
        *job_arguments(config, run_dir),
    ]


def _nodes_of_this_job() -> int:
    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def run_relaunched(config: RunConfig) -> dict[str, Any]:
    """Run this job as an `accelerate launch` of num_processes processes; return its metrics.json record."""
    nodes = _nodes_of_this_job()
    if nodes > 1:
        raise MoraTrainError(
            f"accelerate.num_processes={config.accelerate.num_processes} runs one `accelerate launch` on the job's "
            f"node, but this job has {nodes} nodes; give each job one node (hydra.launcher.nodes=1) with "
            "num_processes GPUs, or run a multi-node job with scripts/launch.sh --nodes M on every node "
            '(docs/distributed.md, "Multi-GPU and multi-node training")'
        )
    run_dir = Path(config.output_dir)
    command = accelerate_command(config, run_dir)
    print(
        f"mora-train: running this job as {config.accelerate.num_processes} processes: {' '.join(command)}", flush=True
    )
    output = LaunchOutput()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    while True:
        try:
            assert process.stderr is not None
            for line in process.stderr:  # shown as it comes; the run's error paragraph kept for the job's record
                sys.stderr.write(line)
                output.read(line)
            status = process.wait()
            break
        except KeyboardInterrupt:
            # The processes got the signal too: they save a checkpoint and stop. Wait for them.
            continue
    sys.stderr.flush()
    if status == 0 and (RunDir(run_dir).metrics).is_file():
        return json.loads((RunDir(run_dir).metrics).read_text())
    code = output.exit_code(status)
    message = (
        f"the {config.accelerate.num_processes}-process accelerate launch of this job failed (exit status {code}): "
        f"{output.reason()} (run dir: {run_dir})"
    )
    if code >= 128:
        raise RunStopped(message, exit_code=code)
    raise MoraTrainError(message, exit_code=code if code >= 2 else 1)


class LaunchOutput:
    """What the launched processes wrote to stderr that says why they failed.

    mora-train's own error paragraph ("mora-train: error: ..." and its indented lines), and the exit codes
    torchrun (under accelerate launch) lists for its failed processes: it exits 1 itself whatever theirs were.
    """

    def __init__(self) -> None:
        self.paragraph: list[str] = []
        self.in_paragraph = False
        self.codes: list[int] = []
        self.tail: deque[str] = deque(maxlen=20)

    def read(self, line: str) -> None:
        self.tail.append(line)
        if line.startswith("mora-train: error"):
            self.paragraph, self.in_paragraph = [line.rstrip()], True
        elif self.in_paragraph and line.startswith((" ", "\t")) and line.strip():
            self.paragraph.append(line.rstrip())
        else:
            self.in_paragraph = False
        found = re.match(r"\s*exitcode\s*:\s*(\d+)", line)  # torchrun's failure summary, root cause last
        if found:
            self.codes.append(int(found.group(1)))

    def exit_code(self, status: int) -> int:
        """The failed process's own exit code when torchrun reported one (e.g. 2, 3, 143), else the launch's."""
        return self.codes[-1] if self.codes else (status if status > 0 else 1)

    def reason(self) -> str:
        if self.paragraph:
            return "\n".join(self.paragraph).removeprefix("mora-train: error: ").removeprefix("mora-train: error")
        return "".join(self.tail).strip()[-1500:] or "no error output"

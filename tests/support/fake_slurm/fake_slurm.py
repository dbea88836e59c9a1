"""A stand-in for SLURM's sbatch, srun, sacct and scancel on one machine, for tests of hydra/launcher=slurm.

Test code only. `sbatch FILE` records FILE's #SBATCH lines in $FAKE_SLURM_DIR/sbatch-JOBID.txt, then runs FILE
with bash once per array task, in the background, with the environment SLURM gives a job (SLURM_JOB_ID,
SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, one task on one node), its stdout/stderr in the --output/--error
files; it prints "Submitted batch job JOBID" as sbatch does. `srun [--flags] CMD` runs CMD with its
--output/--error patterns (%A %a %j %t) filled in. `sacct` knows no job (submitit then waits for the result
file each job writes); `scancel` does nothing. Nothing is scheduled: every task starts at once.
"""

import os
import re
import subprocess
import sys
from pathlib import Path


def fill(pattern: str, env: dict) -> str:
    job = env.get("SLURM_ARRAY_JOB_ID") or env["SLURM_JOB_ID"]
    task = env.get("SLURM_ARRAY_TASK_ID", "0")
    jid = f"{job}_{task}" if env.get("SLURM_ARRAY_JOB_ID") else env["SLURM_JOB_ID"]
    return pattern.replace("%A", job).replace("%a", task).replace("%j", jid).replace("%t", env.get("SLURM_PROCID", "0"))


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    text = script.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, flags=re.MULTILINE))
    state = Path(os.environ["FAKE_SLURM_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    counter = state / "next_job_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 100))
    (state / f"sbatch-{job_id}.txt").write_text(text)
    tasks = range(int(flags["array"].split("%")[0].split("-")[1]) + 1) if "array" in flags else [None]
    for task in tasks:
        # an array task has a job id of its own; a single job has the one sbatch printed
        env = {
            **os.environ,
            "SLURM_JOB_ID": str(job_id if task is None else job_id + 1 + task),
            "SLURM_NTASKS": "1",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_JOB_NODELIST": "localhost",
        }
        if task is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(task))
        out = Path(fill(flags.get("output", "slurm-%j.out"), env))
        err = Path(fill(flags.get("error", "slurm-%j.err"), env))
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as stdout, err.open("a") as stderr:
            subprocess.Popen(["bash", str(script)], env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    print(f"Submitted batch job {job_id}", flush=True)


def srun(args: list[str]) -> None:
    files = {}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            files[flag] = fill(args.pop(0), dict(os.environ))
    with open(files.get("--output", os.devnull), "a") as stdout, open(files.get("--error", os.devnull), "a") as stderr:
        sys.exit(subprocess.call(args, stdout=stdout, stderr=stderr))


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "sbatch":
        sbatch(rest)
    elif command == "srun":
        srun(rest)
    elif command == "sacct":
        print("JobID|State|NodeList")
    # scancel: nothing to cancel

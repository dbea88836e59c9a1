"""Shared pieces of the benchmark scripts (config composition, adapters, /proc readings, the machine line).

They build models and adapters exactly as `mora-train` does: a Hydra config composed from configs/
with the same overrides a user would type, then mora_train.models / mora_train.adapters.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# The task configs read the Hugging Face Hub unless data_dir is set: the benchmarks (and the mora-train
# subprocesses they start, which inherit the environment) read the local copies in ../shared/data.
SHARED_DATA = REPO.parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("MORA_TRAIN_DATA", str(SHARED_DATA))

# The methods compared by the end-to-end benchmarks: name -> adapter overrides (rank is added separately).
METHODS: dict[str, list[str]] = {
    "full": ["adapter=full"],
    "lora": ["adapter=lora"],
    "mora_sharing": ["adapter=mora", "adapter.mora_type=sharing"],
    "mora_rope": ["adapter=mora", "adapter.mora_type=rope"],
}
METHOD_LABELS = {
    "full": "full FT",
    "lora": "LoRA",
    "mora_sharing": "MoRA type 1 (sharing)",
    "mora_rope": "MoRA type 6 (rope)",
}


def compose(overrides: list[str]):  # -> mora_train.pipeline.run_config.RunConfig
    """The typed config `mora-train OVERRIDES...` would run with (its sections checked on their own)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from mora_train.pipeline.run_config import load_run_config

    with initialize_config_dir(config_dir=str(REPO / "mora_train" / "configs"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = "unused-by-benchmarks"  # ${hydra:runtime.output_dir} resolves only inside a Hydra app
    return load_run_config(cfg)


def method_overrides(method: str, rank: int) -> list[str]:
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return [*METHODS[method], f"rank={rank}"]


def build_adapter_from_config(cfg):  # (RunConfig) -> (Adapter, tokenizer)
    """Load the base model and wrap it with the configured adapter (as the pipeline does)."""
    from mora_train.adapters import build_adapter
    from mora_train.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    return build_adapter(model, cfg.adapter, cfg.rank), tokenizer


def finished_record(path: Path, overrides: list[str]) -> dict | None:
    """The record a finished run left at `path`, when it ran with the same overrides (else None)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("overrides") == overrides else None


def save_record(path: Path, record: dict) -> None:
    """Write a run's record atomically: a record on disk always belongs to a finished run."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def run_mora_train(overrides: list[str], run_dir: Path, threads: int | None = None) -> dict:
    """`python -m mora_train OVERRIDES` into run_dir (stdout.log and stderr.log kept there); its metrics.json.

    Exits with the run's last output when it fails.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mora_train", *overrides, f"output_dir={run_dir}", "overwrite=true"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if threads:
        # On a CPU shared with other jobs, torch's default (all cores) can be ~10x slower than 1 thread.
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # check=False: a failure exits below with the run's last output (the logs are written first).
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False)
    (run_dir / "stdout.log").write_text(result.stdout)
    (run_dir / "stderr.log").write_text(result.stderr)
    if result.returncode != 0:
        sys.exit(f"{run_dir.name} failed (exit {result.returncode}); last output:\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later VmHWM is the peak from now on."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. 'AMD EPYC')."""
    return next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )


def machine_line(threads: int) -> str:
    return (
        f"{date.today():%Y-%m-%d}, {cpu_model()}, {torch.get_num_threads() if threads <= 0 else threads} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )

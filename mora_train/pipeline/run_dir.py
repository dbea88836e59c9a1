"""The run dir of a training run: refused before anything is written, then created with its config records; the
checksums of its outputs once they are complete."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from mora_train.config.output_dir import output_dir_problem
from mora_train.core.errors import MoraTrainError, RunStopped
from mora_train.core.io import write_json_atomically, write_text_atomically
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import RunDirLock
from mora_train.pipeline.run_config import ComposedConfig, RunConfig
from mora_train.pipeline.run_log import attach_run_log
from mora_train.training.checkpoints import file_sha256
from mora_train.training.resilience import format_bytes, free_bytes, is_disk_full

log = logging.getLogger(__name__)


def check_run_dir(config: RunConfig, lock: RunDirLock | None = None) -> Path:
    """Every refusal about the run dir itself, before anything is written (prepare_run_dir writes).

    With `lock` (the process that writes the run dir) the writer lock is taken once the location is known to be
    usable and before every refusal that reads the run dir (finished run; the caller's resume plan), so that no
    decision is taken on files another live run is changing: a second writer is refused naming the first's PID."""
    run_dir = Path(config.output_dir)
    problem = output_dir_problem(run_dir)
    if problem:
        raise MoraTrainError(problem)
    if lock is not None:
        lock.acquire()
    if (RunDir(run_dir).metrics).exists() and not config.overwrite:
        raise MoraTrainError(
            f"{run_dir} already holds a finished run (metrics.json); choose another output_dir=... "
            "or pass overwrite=true to replace it"
        )
    return run_dir


def prepare_run_dir(config: RunConfig, composed: ComposedConfig) -> Path:
    """Create the run dir and write its config records; called only once every refusal has passed.

    Writes resolved_config.yaml, Hydra's .hydra/ records (Hydra itself is told not to write them at startup:
    configs/config.yaml sets hydra.output_subdir=null) and starts train.log with what was logged so far."""
    run_dir = check_run_dir(config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = RunDir(run_dir).resolved_config
        _warn_config_changes(config_path, composed.resolved())
        composed.write_records(run_dir)
        write_text_atomically(config_path, composed.resolved_yaml())
    except OSError as err:
        raise output_error(run_dir, err) from None
    attach_run_log(run_dir)
    return run_dir


def output_error(run_dir: Path, err: OSError) -> MoraTrainError:
    """A failed write into the run dir as the project's error: what, where, and the fix."""
    if is_disk_full(err, run_dir):
        return RunStopped(
            f"no space left on the disk holding {run_dir} ({format_bytes(free_bytes(run_dir))} free) while writing "
            f"{err.filename or run_dir}; free some space or choose another output_dir=...",
            exit_code=4,
        )
    return MoraTrainError(
        f"cannot write the run's outputs in {run_dir}: {err.strerror or err} ({err.filename or run_dir}); "
        "choose a writable location with output_dir=..."
    )


def write_output_checksums(run_dir: Path) -> None:
    """RUN_DIR/checksums.json: size and sha256 of every file under adapter/ and merged/ (verify_outputs)."""
    entries = {}
    for name in RunDir.CHECKSUMMED:
        folder = Path(run_dir) / name
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    entries[str(path.relative_to(run_dir))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    write_json_atomically(RunDir(run_dir).checksums, entries)


def _warn_config_changes(previous_path: Path, resolved: dict[str, Any]) -> None:
    """When continuing in a run dir, name the settings that differ from the run's previous start."""
    if not previous_path.is_file():
        return
    try:
        before = _flatten(yaml.safe_load(previous_path.read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - an unreadable old config must not stop a resume
        return
    now = _flatten(resolved)
    ignored = {"output_dir", "overwrite", "trainer.resume"}
    changed = sorted(k for k in before.keys() | now.keys() if k not in ignored and before.get(k) != now.get(k))
    if changed:
        log.warning(
            "the config differs from this run dir's previous start in: %s",
            ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed),
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat

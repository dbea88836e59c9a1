"""Checkpoints that are either complete or absent, and which one a run resumes from.

A checkpoint is written into `checkpoints/.staging/checkpoint-N`, gets a `checkpoint_complete.json`
listing every file and its size, is fsynced, and only then is renamed to `checkpoints/checkpoint-N`.
A kill at any moment therefore leaves either the previous set of checkpoints or the new one;
leftovers (`.staging`, `.trash-*`) are never taken for a checkpoint and are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from mora_train.core.errors import MoraTrainError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"
TRASH_PREFIX = ".trash-"
COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINISHED_RUN_OUTPUTS = ("adapter", "merged")


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def is_complete(checkpoint: Path) -> bool:
    """True when the folder holds a completion marker and every file it lists, at the listed size."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
        return all((Path(checkpoint) / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint folders under checkpoints_dir, oldest step first."""
    if not Path(checkpoints_dir).is_dir():
        return []
    found = [p for p in Path(checkpoints_dir).iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted((p for p in found if is_complete(p)), key=checkpoint_step)


def incomplete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    if not Path(checkpoints_dir).is_dir():
        return []
    return sorted(
        p for p in Path(checkpoints_dir).iterdir() if p.is_dir() and checkpoint_step(p) is not None and not is_complete(p)
    )


def newest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Delete what killed saves leave behind (staging folders, half-deleted old checkpoints)."""
    if not Path(checkpoints_dir).is_dir():
        return
    for path in Path(checkpoints_dir).iterdir():
        if path.name == STAGING_DIR or path.name.startswith(TRASH_PREFIX):
            log.info("removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def remove_run_dir_leftovers(run_dir: Path) -> None:
    """Delete temporary folders and files of killed atomic writes (`.adapter.tmp-PID`, `.merged.old-PID`, ...)."""
    if not Path(run_dir).is_dir():
        return
    for path in Path(run_dir).iterdir():
        leftover = re.search(r"\.(tmp|old)-\d+(\.\w+)?$", path.name) or path.name.startswith(TRASH_PREFIX)
        if path.name.startswith(".") and leftover:
            log.info("removing %s, left by an interrupted write", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _remove_via_trash(path: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.trash-*` folder, never a gutted checkpoint-N.

    (`.trash-*` folders in the run dir or checkpoints/ are removed by the next start.)"""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish(staged: Path, final: Path, info: dict[str, Any]) -> None:
    """Mark the staged checkpoint complete (file list + sizes), fsync it, and rename it to `final`."""
    staged, final = Path(staged), Path(final)
    files = {}
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            _fsync(path)
            files[str(path.relative_to(staged))] = path.stat().st_size
    marker = staged / COMPLETE_MARKER
    marker.write_text(json.dumps({**info, "files": files}, indent=2) + "\n")
    _fsync(marker)
    if final.exists():  # the same step saved twice (e.g. a stop request right after a scheduled save)
        _remove_via_trash(final)
    os.replace(staged, final)
    _fsync(final.parent, directory=True)
    if staged.parent.name == STAGING_DIR:
        try:
            staged.parent.rmdir()  # only when empty (another process's files may still be staged)
        except OSError:
            pass


def rotate(checkpoints_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (all when keep is None or < 1)."""
    if keep is None or keep < 1:
        return
    for old in complete_checkpoints(checkpoints_dir)[:-keep]:
        log.info("deleting old checkpoint %s (trainer.save_total_limit=%d)", old, keep)
        _remove_via_trash(old)


def _describe(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _check_matches(checkpoint: Path, adapter_name: str, rank: int | None) -> None:
    info = _describe(checkpoint)
    saved_adapter, saved_rank = info.get("adapter"), info.get("rank")
    if saved_adapter and (saved_adapter != adapter_name or (adapter_name != "full" and saved_rank != rank)):
        raise MoraTrainError(
            f"checkpoint {checkpoint} was written by adapter={saved_adapter}"
            + (f" rank={saved_rank}" if saved_adapter != "full" else "")
            + f", but this run is adapter={adapter_name}"
            + (f" rank={rank}" if adapter_name != "full" else "")
            + "; resume with the settings it was trained with, or start over with trainer.resume=false overwrite=true "
            "(or another output_dir)"
        )


def is_main_process() -> bool:
    """Only the first process of a multi-process run deletes anything (all of them read)."""
    return int(os.environ.get("RANK", "0")) == 0


def plan_resume(
    run_dir: Path, resume: Any, overwrite: bool, adapter_name: str, rank: int | None
) -> Path | None:
    """The checkpoint this run continues from (None: start from scratch), cleaning up what that requires.

    resume: "auto" (newest complete checkpoint under run_dir/checkpoints, if any), True (the same,
    but one must exist), False (start over), or a path to a checkpoint folder or a run folder.
    Starting over in a run dir that holds checkpoints needs overwrite=true, so a typo never deletes progress.
    A finished run dir (metrics.json) only gets here with overwrite=true: its outputs are removed first.
    """
    run_dir = Path(run_dir)
    checkpoints_dir = run_dir / CHECKPOINTS_DIR
    main = is_main_process()
    if main:
        remove_run_dir_leftovers(run_dir)
        remove_leftovers(checkpoints_dir)
    for partial in incomplete_checkpoints(checkpoints_dir):
        log.warning("ignoring %s: it has no completion marker (a save that did not finish)", partial)
    existing = complete_checkpoints(checkpoints_dir)
    finished = (run_dir / "metrics.json").exists()

    # Decide first (raising on any problem), delete afterwards: a refused start deletes nothing.
    start: Path | None = None
    discard: list[Path] = []
    if isinstance(resume, str) and resume != "auto":
        start = Path(resume).expanduser()
        if checkpoint_step(start) is None and (start / CHECKPOINTS_DIR).is_dir():
            start = newest_complete_checkpoint(start / CHECKPOINTS_DIR) or start / CHECKPOINTS_DIR
        if not is_complete(start):
            raise MoraTrainError(
                f"trainer.resume={resume}: {start} is not a complete checkpoint (no {COMPLETE_MARKER}, or a file "
                "it lists is missing or truncated); give a RUN_DIR/checkpoints/checkpoint-N folder, a run dir, "
                "or trainer.resume=auto"
            )
        _check_matches(start, adapter_name, rank)
    elif resume is False or finished:  # start over
        if resume is True:
            raise MoraTrainError(
                f"trainer.resume=true, but {run_dir} holds a finished run, which overwrite=true replaces; "
                "use trainer.resume=auto, or trainer.resume=PATH to continue from one of its checkpoints"
            )
        if existing and not overwrite:
            raise MoraTrainError(
                f"{checkpoints_dir} holds checkpoints of an unfinished run (newest: step "
                f"{checkpoint_step(existing[-1])}) and trainer.resume=false would discard them; pass overwrite=true "
                "as well to start over, or drop trainer.resume=false to continue from the newest"
            )
        discard = existing
    elif existing:
        _check_matches(existing[-1], adapter_name, rank)
        start = existing[-1]
    elif resume is True:
        raise MoraTrainError(
            f"trainer.resume=true but {checkpoints_dir} holds no complete checkpoint; "
            "use trainer.resume=auto to start from scratch when there is none"
        )

    if main and finished:
        # metrics.json goes first: until the new run writes its own, the dir no longer looks finished.
        log.warning("overwrite=true: replacing the finished run in %s", run_dir)
        (run_dir / "metrics.json").unlink()
        for name in FINISHED_RUN_OUTPUTS:
            if (run_dir / name).exists():
                _remove_via_trash(run_dir / name)
    if main and discard:
        log.warning("starting over: deleting the old checkpoints in %s (overwrite=true)", checkpoints_dir)
        for old in discard:
            _remove_via_trash(old)
    return start


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run (Hydra's overrides, with output_dir pinned)."""
    pinned = f"output_dir={Path(run_dir).resolve()}"
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not running under Hydra (e.g. pipeline.run called from Python)
        return f"run it again with {pinned} (trainer.resume=auto, the default, picks up the newest checkpoint)"
    dropped = ("output_dir", "trainer.resume", "overwrite")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in dropped]
    return "mora-train " + " ".join(shlex.quote(a) for a in [*kept, pinned])

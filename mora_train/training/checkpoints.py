"""Checkpoints that are either complete or absent (which one a run resumes from: mora_train.training.resume).

A checkpoint is written into `checkpoints/.staging/checkpoint-N`, gets a `checkpoint_complete.json`
listing every file with its size and sha256, is fsynced, and only then is renamed to `checkpoints/checkpoint-N`.
A kill at any moment therefore leaves either the previous set of checkpoints or the new one;
leftovers (`.staging`, `.trash-*`) are never taken for a checkpoint and are removed on the next start.

Since only complete checkpoints are ever renamed to `checkpoint-N`, every `checkpoint-N` that does not verify is
corrupt, whatever happened to it: a file truncated, emptied, deleted or changed in place (same size, another
sha256), the marker deleted or unreadable, a file that cannot be read. Resuming verifies the checkpoint it picks
against its checksums (`verify`) and looks at the others cheaply (marker, files, sizes); every corrupt one is
moved aside to `checkpoints/.corrupt-checkpoint-N` (never deleted, never listed, never rotated away) with a
warning naming the file and what is wrong with it, and the newest intact one is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mora_train.core.io import normalize_permissions, write_json_atomically
from mora_train.core.run_dir import RunDir

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
TRASH_PREFIX = ".trash-"
CORRUPT_PREFIX = ".corrupt-"  # a checkpoint that failed verification, moved aside: kept for inspection, never listed
COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_RE = re.compile(rf"^{re.escape(RunDir.CHECKPOINT_PREFIX)}(\d+)$")


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


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB chunks (constant memory; ~1-2 GB/s on one core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(checkpoint: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint is intact, else what is wrong with it (one line, naming the file).

    Intact: the completion marker lists every file at its size and, when the marker records checksums
    (every checkpoint since checksums were added), with its sha256. Older markers are checked by size only,
    and so is every checkpoint with checksums=False (a cheap look that reads no file's content).
    """
    checkpoint = Path(checkpoint)
    marker = checkpoint / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
        files, sums = info["files"], info.get("sha256") or {}
        if not isinstance(files, dict) or not isinstance(sums, dict):
            raise TypeError("malformed file list")
    except FileNotFoundError:
        return f"it has no {COMPLETE_MARKER} (its save never finished, or the marker was deleted)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {COMPLETE_MARKER} is unreadable ({type(err).__name__}: {err})"
    for name, size in files.items():
        path = checkpoint / name
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes, the manifest says {size} (truncated or replaced)"
            if checksums and name in sums and file_sha256(path) != sums[name]:
                return f"{name} does not match its sha256 in {COMPLETE_MARKER} (corrupted in place)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


def move_aside(checkpoint: Path) -> Path:
    """Rename a corrupt checkpoint to `.corrupt-checkpoint-N` beside it (never deleted: it may be inspected)."""
    checkpoint = Path(checkpoint)
    target = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}")
    number = 1
    while target.exists():
        number += 1
        target = checkpoint.with_name(f"{CORRUPT_PREFIX}{checkpoint.name}-{number}")
    os.replace(checkpoint, target)
    return target


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
    return [p for p in checkpoint_folders(checkpoints_dir) if is_complete(p)]


def checkpoint_folders(checkpoints_dir: Path) -> list[Path]:
    """Every folder named checkpoint-N under checkpoints_dir, complete or not, oldest step first."""
    if not Path(checkpoints_dir).is_dir():
        return []
    folders = (p for p in Path(checkpoints_dir).iterdir() if p.is_dir())
    steps = {p: step for p in folders if (step := checkpoint_step(p)) is not None}
    return sorted(steps, key=steps.__getitem__)


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


def remove_via_trash(path: Path) -> None:
    """Rename, then delete: a kill mid-delete leaves a `.trash-*` folder, never a gutted checkpoint-N.

    (`.trash-*` folders in the run dir or checkpoints/ are removed by the next start.)"""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish(staged: Path, final: Path, info: dict[str, Any]) -> None:
    """Mark the staged checkpoint complete (file list + sizes), fsync it, and rename it to `final`."""
    staged, final = Path(staged), Path(final)
    normalize_permissions(staged)  # 0644/0755 under the usual umask, like every other output
    files, sums = {}, {}
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            _fsync(path)
            name = str(path.relative_to(staged))
            files[name] = path.stat().st_size
            sums[name] = file_sha256(path)  # read back from the page cache just written: cheap
    marker = staged / COMPLETE_MARKER
    write_json_atomically(marker, {**info, "files": files, "sha256": sums})
    _fsync(marker)
    if final.exists():  # the same step saved twice (e.g. a stop request right after a scheduled save)
        remove_via_trash(final)
    os.replace(staged, final)
    _fsync(final.parent, directory=True)
    if staged.parent.name == STAGING_DIR:
        with contextlib.suppress(OSError):
            staged.parent.rmdir()  # only when empty (another process's files may still be staged)


def rotate(checkpoints_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Keep the newest `limit` complete checkpoints (all when limit is None or < 1), and `keep` (the best one)."""
    if limit is None or limit < 1:
        return
    for old in complete_checkpoints(checkpoints_dir)[:-limit]:
        if keep is not None and old.name == Path(keep).name:
            continue
        log.info("deleting old checkpoint %s (trainer.save_total_limit=%d)", old, limit)
        remove_via_trash(old)

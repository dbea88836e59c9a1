"""Checkpoints that are either complete or absent, and which one a run resumes from.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mora_train.config.overrides import paste_command, shell_override
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import normalize_permissions, write_json_atomically

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"
TRASH_PREFIX = ".trash-"
CORRUPT_PREFIX = ".corrupt-"  # a checkpoint that failed verification, moved aside: kept for inspection, never listed
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


def _remove_via_trash(path: Path) -> None:
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
        _remove_via_trash(final)
    os.replace(staged, final)
    _fsync(final.parent, directory=True)
    if staged.parent.name == STAGING_DIR:
        with contextlib.suppress(OSError):
            staged.parent.rmdir()  # only when empty (another process's files may still be staged)


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


def _describe_identity(identity: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in identity.items())


def _check_matches(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse a checkpoint written by another method or rank (compared as Adapter.identity records them)."""
    info = _describe(checkpoint)
    saved = {key: info.get(key) for key in identity}
    if info.get("adapter") and saved != identity:
        written = {key: info[key] for key in info if key in identity or key == "adapter"}
        raise MoraTrainError(
            f"checkpoint {checkpoint} was written by {_describe_identity(written)}, but this run is "
            f"{_describe_identity(identity)}; resume with the settings it was trained with, or start over with "
            "trainer.resume=false overwrite=true (or another output_dir)"
        )


def is_main_process() -> bool:
    """Only the first process of a multi-process run deletes anything (all of them read)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class ResumePlan:
    """What a start will do in its run dir, decided (and refused) before anything there is changed."""

    run_dir: Path
    start: Path | None = None  # the checkpoint to continue from; None: from scratch
    discard: list[Path] = field(default_factory=list)  # old checkpoints deleted when starting over
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # moved aside, with what was wrong
    replace_finished: bool = False  # overwrite=true over a finished run: its outputs are removed


def _newest_intact(candidates: list[Path], everyone: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the corrupt ones met on the way (with what was wrong).

    Checksums are computed newest first until one checkpoint verifies. With everyone=True every candidate
    also gets the cheap look (marker, files, sizes: no content read), so that a truncated, emptied or
    unmarked checkpoint-N older than the one resumed from is found too, and kept aside rather than later
    deleted by rotation."""
    corrupt = []
    if everyone:
        corrupt = [(c, why) for c in reversed(candidates) if (why := verify(c, checksums=False)) is not None]
        candidates = [c for c in candidates if c not in {path for path, _ in corrupt}]
    for checkpoint in reversed(candidates):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint, corrupt
        corrupt.append((checkpoint, problem))
    return None, corrupt


def _all_corrupt_error(where: Path, corrupt: list[tuple[Path, str]]) -> MoraTrainError:
    listing = "; ".join(f"{p.name}: {why}" for p, why in corrupt)
    return MoraTrainError(
        f"no intact checkpoint to resume from in {where}: {listing}. Nothing was deleted. Restore the files, "
        "or start over with trainer.resume=false overwrite=true (the corrupt checkpoints are then deleted too)"
    )


def decide_resume(run_dir: Path, resume: Any, overwrite: bool, identity: dict[str, Any]) -> ResumePlan:
    """Which checkpoint this run continues from, and what that requires; raises before changing anything.

    resume: "auto" (newest intact checkpoint under run_dir/checkpoints, if any), True (the same,
    but one must exist), False (start over), or a path to a checkpoint folder or a run folder.
    Starting over in a run dir that holds checkpoints needs overwrite=true, so a typo never deletes progress.
    `identity` (adapters.adapter_identity) is what the checkpoint must have been written by.
    """
    run_dir = Path(run_dir)
    checkpoints_dir = run_dir / CHECKPOINTS_DIR
    found = checkpoint_folders(checkpoints_dir)  # a checkpoint-N was published complete: if it is not, it is corrupt
    existing = [p for p in found if is_complete(p)]
    finished = (run_dir / "metrics.json").exists()
    plan = ResumePlan(run_dir, replace_finished=finished)

    if isinstance(resume, str) and resume != "auto":
        given = Path(resume).expanduser()
        if checkpoint_step(given) is None and (given / CHECKPOINTS_DIR).is_dir():
            candidates = complete_checkpoints(given / CHECKPOINTS_DIR)
            if not candidates:
                raise MoraTrainError(
                    f"trainer.resume={resume}: {given / CHECKPOINTS_DIR} holds no complete checkpoint; give a "
                    "RUN_DIR/checkpoints/checkpoint-N folder, a run dir with checkpoints, or trainer.resume=auto"
                )
            plan.start, corrupt = _newest_intact(candidates)
            if plan.start is None:
                raise _all_corrupt_error(given / CHECKPOINTS_DIR, corrupt)
            for path, why in corrupt:  # another run dir's files: reported, not moved
                log.warning("skipping corrupt checkpoint %s: %s", path, why)
        else:
            if not is_complete(given):
                raise MoraTrainError(
                    f"trainer.resume={resume}: {given} is not a complete checkpoint (no {COMPLETE_MARKER}, or a file "
                    "it lists is missing or truncated); give a RUN_DIR/checkpoints/checkpoint-N folder, a run dir, "
                    "or trainer.resume=auto"
                )
            problem = verify(given)
            if problem is not None:
                raise MoraTrainError(
                    f"trainer.resume={resume}: checkpoint {given} is corrupt: {problem}. Give an older checkpoint "
                    "(trainer.resume=PATH/checkpoint-N) or its run dir, which falls back to the newest intact one"
                )
            plan.start = given
        _check_matches(plan.start, identity)
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
        plan.discard = found
    elif found:
        if existing:
            _check_matches(existing[-1], identity)
        plan.start, plan.corrupt = _newest_intact(found, everyone=True)
        if plan.start is None:
            raise _all_corrupt_error(checkpoints_dir, plan.corrupt)
        _check_matches(plan.start, identity)
    elif resume is True:
        raise MoraTrainError(
            f"trainer.resume=true but {checkpoints_dir} holds no complete checkpoint; "
            "use trainer.resume=auto to start from scratch when there is none"
        )
    return plan


def apply_resume_plan(plan: ResumePlan) -> Path | None:
    """Carry out a decided plan (main process only deletes or moves): clean leftovers, move corrupt
    checkpoints aside, remove a replaced finished run's outputs or discarded checkpoints. Returns plan.start."""
    run_dir = plan.run_dir
    checkpoints_dir = run_dir / CHECKPOINTS_DIR
    if not is_main_process():
        return plan.start
    remove_run_dir_leftovers(run_dir)
    remove_leftovers(checkpoints_dir)
    for path, why in plan.corrupt:
        aside = move_aside(path)
        log.warning(
            "checkpoint %s is corrupt: %s; moved it aside to %s (kept for inspection) and resuming from %s",
            path,
            why,
            aside,
            plan.start,
        )
    if plan.replace_finished and (run_dir / "metrics.json").exists():
        # metrics.json goes first: until the new run writes its own, the dir no longer looks finished.
        log.warning("overwrite=true: replacing the finished run in %s", run_dir)
        (run_dir / "metrics.json").unlink()
        for name in FINISHED_RUN_OUTPUTS:
            if (run_dir / name).exists():
                _remove_via_trash(run_dir / name)
    if plan.discard:
        log.warning("starting over: deleting the old checkpoints in %s (overwrite=true)", checkpoints_dir)
        for old in plan.discard:
            if old.exists():
                _remove_via_trash(old)
    return plan.start


def plan_resume(run_dir: Path, resume: Any, overwrite: bool, identity: dict[str, Any]) -> Path | None:
    """decide_resume, then apply_resume_plan: the checkpoint to continue from (None: from scratch).

    A finished run dir (metrics.json) only gets here with overwrite=true: its outputs are removed first.
    """
    return apply_resume_plan(decide_resume(run_dir, resume, overwrite, identity))


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run (Hydra's overrides, with output_dir pinned), paste-able as printed."""
    output_dir = str(Path(run_dir).resolve())
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not running under Hydra (e.g. pipeline.run called from Python)
        return (
            f"run it again with {shell_override('output_dir', output_dir)} (trainer.resume=auto, the default, "
            "picks up the newest checkpoint)"
        )
    return paste_command(overrides, "output_dir", output_dir, dropped=("trainer.resume", "overwrite"))

"""`output_dir`: where a run can be written, checked before anything is (by the CLI before Hydra creates the
folder, and by the pipeline before a run starts). Light on purpose: the CLI checks it before importing torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mora_train.core.paths import nearest_existing


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def output_dir_problem(output_dir: str | Path | None, key: str = "output_dir") -> str | None:
    """Why no run can be written at output_dir (empty, a file, a dangling link, a read-only or kernel
    filesystem, a folder not yours), or None. `key` names the setting in the message (hydra.sweep.dir for -m).

    Checked before anything is written (also by the CLI before Hydra creates the folder)."""
    if output_dir is None or not str(output_dir).strip():
        what = (
            f"{key}=null names no folder"
            if output_dir is None
            else f"{key}={str(output_dir)!r} is empty: the run would be written into the current folder"
        )
        return (
            f"{what}. Give a folder, e.g. {key}=runs/my-run, or leave {key} out for a new dated folder under "
            "outputs/ (check for an unset shell variable)"
        )
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        return (
            f"{key}={output_dir} is an existing file, not a folder; choose a folder path "
            f"(a new one is created) with {key}=..."
        )
    absolute = Path(os.path.abspath(path))
    for part in (absolute, *absolute.parents):  # a link to nowhere: mkdir cannot create the folder it names
        if part.is_symlink() and not part.exists():
            return (
                f"{key}={output_dir}: {part} is a symbolic link to {os.readlink(part)}, which does not exist; "
                f"create that folder, remove the link, or choose another {key}=..."
            )
    existing = nearest_existing(absolute)
    if not existing.is_dir():
        return (
            f"{key}={output_dir}: {existing} is a file, so no folder can be created under it; choose another {key}=..."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "a read-only filesystem" if _read_only(existing) else "a folder you cannot write to"
        return (
            f"{key}={output_dir}: {existing} is on {what}, so the run cannot write its outputs there; "
            f"choose a writable location with {key}=..."
        )
    # root passes os.access everywhere, yet /sys or /proc refuse a new folder: try one (an existing run dir is
    # left alone)
    try:
        if existing != absolute:
            os.rmdir(tempfile.mkdtemp(prefix=".mora-train-probe-", dir=existing))
    except OSError as err:
        return (
            f"{key}={output_dir}: no folder can be created in {existing} ({err.strerror or err}), so the run "
            f"cannot write its outputs there; choose a writable location with {key}=..."
        )
    return None

"""Atomic writes: a reader (a report, a resumed run, another rank) sees the old file or the new one, never half of one.

Every helper writes into a temporary sibling named `.NAME.tmp-PID` (a folder for
write_dir_atomically) and renames it over the target last; on an error the temporary is
removed, so a full disk leaves no debris. A killed process leaves only a `.tmp-PID` sibling,
which training/checkpoints.py's cleanup recognises.

Outputs get the permissions of a plain `open()` under the process umask (0644 / 0755 with the usual 022),
whatever the writer used: safetensors files written by transformers' save_pretrained come out 0600 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """`.NAME.tmp-PID` beside path: hidden, unique per process, and recognisable as debris."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(path: Path) -> None:
    """Files 0666 & ~umask, folders 0777 & ~umask (recursively): what a plain open()/mkdir() gives."""
    mask = current_umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)


def write_file_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp_path) to write the whole file, then rename it to path."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        normalize_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomically(path: Path, data: Any, default: Callable[[Any], Any] | None = None) -> None:
    """data as indented JSON (+ newline); `default` converts what json cannot (e.g. `str`)."""
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=False, default=default) + "\n")


def write_dir_atomically(target: Path, write: Callable[[Path], Any], keep_existing: bool = False) -> None:
    """Call write(tmp_dir), then rename tmp_dir to target: readers never see a half-written folder.

    An existing target is replaced; with keep_existing=True it is kept instead and ours discarded
    (for caches that another process may fill with the same content first). Replacing deletes whatever the
    target held: a command writing a folder the user named checks it first (core/outputs.check_output_target).
    """
    target = Path(target)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        normalize_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: give the space back, leave no debris
        raise
    if keep_existing:
        try:
            os.replace(tmp, target)  # fails on an existing, non-empty folder
        except OSError:
            if not target.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; theirs is as good
        return
    old = temporary_sibling(target, "old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_figure_atomically(fig: Any, path: Path, dpi: int = 100) -> None:
    """Save a matplotlib figure (format from path's suffix, PNG by default) atomically, then close it."""
    path = Path(path)
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        import matplotlib.pyplot as plt  # imported here: only plotting code pays for matplotlib

        plt.close(fig)

"""Local data paths: which files a `path` names (a file, a glob, a folder) and why one names none."""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path

LOCAL_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "txt",
}
GLOB_CHARS = set("*?[")


def expand_path(path: str) -> list[Path]:
    """Files named by a path: itself, a glob's matches, or a folder's supported files (recursively), sorted."""
    expanded = os.path.expanduser(path)
    if GLOB_CHARS & set(expanded):
        return [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if Path(p).is_file()]
    p = Path(expanded)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_FORMATS)
    return [p] if p.is_file() else []


def missing_path_message(key: str, path: str, folders: bool = True) -> str:
    """Why `path` gives no data file: nothing there, a folder without data files (`folders`: a folder is read for
    its data files; else only a file will do), or not a regular file."""
    if GLOB_CHARS & set(path):
        return f"`{key}={path}` matches no file; check the pattern"
    found = Path(os.path.expanduser(path))
    if found.is_dir() and not folders:
        return f"`{key}={path}` is a folder; give a file"
    if found.is_dir():
        others = sorted({f.suffix or f.name for f in found.rglob("*") if f.is_file()})[:8]
        held = f"it holds only {', '.join(others)} files" if others else "it is empty"
        return (
            f"`{key}={path}` is a folder with no data file in it ({held}); a folder is read for its "
            f"{', '.join(LOCAL_FORMATS)} files (in subfolders too): add some, or give the file itself"
        )
    if found.is_symlink() and not found.exists():
        return (
            f"`{key}={path}` is a symbolic link to {os.readlink(found)}, which does not exist; fix the link or "
            "give the file"
        )
    if found.exists():  # neither a regular file nor a folder
        return (
            f"`{key}={path}` is {_file_kind(found)}, not a regular file: its content can be read only once and "
            "has no size or date to fingerprint for the data cache; save it to a file and give that file's path"
        )
    hint = ""
    if "shared/data" in path:
        hint = (
            " (the shipped configs read ../shared/data beside the repository; set MORA_TRAIN_DATA=/path/to/data "
            "or data_dir=... to use another folder)"
        )
    return f"`{key}={path}` does not exist{hint}"


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")

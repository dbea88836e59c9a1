"""Where a command may write: the one rule every command that writes a path the user named follows.

A command never destroys what it did not write. Before anything is loaded, a target is refused (MoraTrainError,
exit 2, one paragraph naming the path and the fix) when it is

- empty or only whitespace (an unset shell variable: `--output "$OUT"`), which would silently mean the current folder;
- of the wrong kind: an existing file where a folder is written, a folder, device or pipe where a file is;
- under a file, or in a folder that cannot be written;
- one of the command's sources, inside one, or — for a command that replaces its target whole — holding one:
  writing there would change what the command reads (a run's own `adapter/`, the requests file);
- existing and not written by this command: a non-empty folder it would replace, a file it would replace, or
  files of the names it writes into a folder. What the command wrote earlier (recognised by `ours`) may be
  replaced; the writers replace atomically (mora_train.core.io).

Three kinds of target: FOLDER (replaced whole: the export), FILE (replaced: generate's answers), FILES (named
files written into a folder, the rest of the folder left alone: the report and the spectrum).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from mora_train.core.errors import MoraTrainError
from mora_train.core.paths import nearest_existing

FOLDER, FILE, FILES = "folder", "file", "files"


def _real(path: Path) -> Path:
    """The path with every symlink resolved (a link to a source is that source), existing or not."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def blank_path_problem(value: object, option: str) -> str | None:
    """An empty or whitespace-only path: Path("") is ".", the current folder, which nobody means."""
    if value is None or str(value).strip():
        return None
    return (
        f"{option} is empty ({str(value)!r}): an empty path would mean the current folder. Give the path "
        "explicitly (check for an unset shell variable)"
    )


def _location_problem(target: Path, option: str, kind: str) -> str | None:
    """Nothing can be written at target: the folder it goes into (or the nearest existing one above) is a file
    or not writable. A folder replaced whole and a file are renamed into their parent; FILES go into the folder."""
    above = nearest_existing(_real(target) if kind == FILES and target.is_dir() else _real(target).parent)
    if not above.is_dir():
        return f"{option} {target}: {above} is a file, so nothing can be created under it; choose another path"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{option} {target}: {above} cannot be written (read-only or not yours); choose a writable location"
    return None


def _source_problem(target: Path, option: str, command: str, sources: list[Path], kind: str) -> str | None:
    real = _real(target)
    for source in sources:
        source_real = _real(source)
        if real == source_real:
            return (
                f"{option} {target} is {source} itself, which {command} reads: writing there would change its "
                "own input. Choose a new path outside it"
            )
        if real.is_relative_to(source_real):
            return (
                f"{option} {target} is inside {source}, which {command} reads: writing there would change its "
                f"own input. Choose a path outside {source}"
            )
        if kind == FOLDER and source_real.is_relative_to(real):
            return (
                f"{option} {target} holds {source}, which {command} reads, and {command} replaces {option} "
                "whole: the source would be deleted. Choose a new or empty folder elsewhere"
            )
    return None


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _existing_problem(
    target: Path, option: str, command: str, kind: str, ours: Callable[[Path], bool], names: list[str]
) -> str | None:
    """An existing target this command did not write, or one of the wrong kind."""
    if kind == FILE:
        if target.is_dir():
            return f"{option} {target} is a folder; give a file path (a new file, or one {command} wrote before)"
        if target.exists() and not target.is_file():
            return f"{option} {target} is not a regular file (a device, pipe or socket); give a file path"
        if target.is_file() and target.stat().st_size > 0 and not ours(target):
            return (
                f"{option} {target} already exists and was not written by {command}: it would be overwritten. "
                "Choose a new file name, or move that file away first"
            )
        return None
    if target.exists() and not target.is_dir():
        return f"{option} {target} is an existing file, not a folder; choose a folder path (a new one is created)"
    if not target.is_dir():
        return None
    if kind == FOLDER:
        if any(target.iterdir()) and not ours(target):
            return (
                f"{option} {target} is a folder that already holds files not written by {command} "
                f"({_listing(target)}); {command} replaces its output folder whole, so they would be deleted. "
                "Choose a new or empty folder, or move those files away first"
            )
        return None
    clashes = [name for name in names if (target / name).exists()]
    if clashes and not ours(target):
        return (
            f"{option} {target} already holds {', '.join(clashes)}, not written by {command}; it would overwrite "
            f"them. Choose another folder ({option} DIR), or move those files away first"
        )
    return None


def output_target_problem(
    target: str | Path | None,
    command: str,
    option: str,
    kind: str,
    sources: Iterable[str | Path | None] = (),
    ours: Callable[[Path], bool] | None = None,
    names: Iterable[str] = (),
) -> str | None:
    """Why `command` must not write `target` (given as `option`), or None. See the module docstring.

    sources: what the command reads (missing ones and None are skipped: nothing there to damage);
    ours(path): True for a folder (FOLDER, FILES) or file (FILE) that this command wrote earlier;
    names: for FILES, the file names written into the folder.
    """
    blank = blank_path_problem(target, option)
    if blank:
        return blank
    if "\0" in str(target):
        return f"{option} {str(target)!r} holds a NUL character, which no path can hold; give a valid path"
    path = Path(os.path.expanduser(str(target)))
    try:
        existing_sources = [Path(os.path.expanduser(str(s))) for s in sources if s is not None and str(s).strip()]
        existing_sources = [s for s in existing_sources if s.exists()]
        return (
            _source_problem(path, option, command, existing_sources, kind)
            or _existing_problem(path, option, command, kind, ours or (lambda _: False), list(names))
            or _location_problem(path, option, kind)
        )
    except OSError as err:  # e.g. a folder that cannot be listed, a name too long for the filesystem
        return (
            f"{option} {target} cannot be checked ({err.strerror or err}: {err.filename or target}); "
            "choose another path"
        )
    except ValueError as err:  # a source path holding a NUL character
        return f"{option} {target} cannot be checked against the paths it reads ({err}); check them"


def check_output_target(
    target: str | Path | None,
    command: str,
    option: str,
    kind: str,
    sources: Iterable[str | Path | None] = (),
    ours: Callable[[Path], bool] | None = None,
    names: Iterable[str] = (),
) -> Path:
    """output_target_problem as an error (MoraTrainError, exit 2); the target as a Path when it may be written."""
    problem = output_target_problem(target, command, option, kind, sources, ours, names)
    if problem:
        raise MoraTrainError(problem)
    return Path(os.path.expanduser(str(target)))


def holds_file(name: str) -> Callable[[Path], bool]:
    """`ours` for a folder recognised by a provenance file its writer always leaves (e.g. export_report.json)."""
    return lambda folder: (Path(folder) / name).is_file()

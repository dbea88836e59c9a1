"""Fault injection for the resilience tests, switched on by one environment variable.

    MORA_TRAIN_FAULT=<fault>@<point>=<n>

| fault     | @step=n (when optimizer step n begins)      | @save=n (checkpoint n written, not yet published) |
|-----------|---------------------------------------------|---------------------------------------------------|
| `sigkill` | the process SIGKILLs itself                 | the process SIGKILLs itself mid-save             |
| `sigint`, `sigterm` | the process sends itself the signal | the process sends itself the signal              |
| `nan`     | step n's loss becomes NaN (poisons its grads) | —                                               |
| `enospc`  | —                                           | the save fails with OSError(ENOSPC)               |
| `fill`    | the disk holding the run dir is filled up (a real disk-full on the next write) | — |

Faults fire once per process. Unset (the normal case) every hook is a cheap no-op; nothing here
changes what a run computes.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

ENV_VAR = "MORA_TRAIN_FAULT"
FAULTS = ("sigkill", "sigint", "sigterm", "nan", "enospc", "fill")
POINTS = ("step", "save")
FILLER_NAME = ".mora-train-fault-filler"

_fired: set[str] = set()


def parse(spec: str) -> tuple[str, str, int]:
    """'sigkill@step=3' -> ('sigkill', 'step', 3); ValueError naming the accepted forms otherwise."""
    try:
        fault, rest = spec.split("@", 1)
        point, number = rest.split("=", 1)
        parsed = (fault.strip(), point.strip(), int(number))
    except ValueError:
        parsed = ("", "", 0)
    if parsed[0] not in FAULTS or parsed[1] not in POINTS or parsed[2] < 1:
        raise ValueError(
            f"{ENV_VAR}={spec!r} is not understood; use <fault>@<point>=<n> with fault in {FAULTS}, "
            f"point in {POINTS} and n >= 1 (e.g. sigkill@step=3)"
        )
    return parsed


def _armed(fault: str, point: str, number: int) -> bool:
    spec = os.environ.get(ENV_VAR)
    if not spec or spec in _fired:
        return False
    if parse(spec) != (fault, point, number):
        return False
    _fired.add(spec)
    return True


def _signal_self(fault: str) -> None:
    sig = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[fault]
    os.kill(os.getpid(), sig)


def at_step_begin(step: int, run_dir: Path) -> None:
    """Called as optimizer step `step` (1-based) begins."""
    for fault in ("sigkill", "sigint", "sigterm"):
        if _armed(fault, "step", step):
            _signal_self(fault)
    if _armed("fill", "step", step):
        fill_disk(run_dir)


def poison_loss(step: int) -> bool:
    """True when step `step`'s loss should be made NaN."""
    return _armed("nan", "step", step)


def during_save(step: int, staged_dir: Path) -> None:
    """Called after checkpoint `step` has been written to its staging folder, before it is published."""
    for fault in ("sigkill", "sigint", "sigterm"):
        if _armed(fault, "save", step):
            _signal_self(fault)
    if _armed("enospc", "save", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staged_dir / "optimizer.pt"))


def fill_disk(run_dir: Path) -> None:
    """Write zeros into run_dir until the filesystem is full (for tests on a small tmpfs only)."""
    chunk = b"\0" * (1 << 16)
    with open(Path(run_dir) / FILLER_NAME, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(chunk)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise

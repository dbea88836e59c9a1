"""Another process that takes and drops run-dir locks on command: the live writer the one-writer tests need.

A real second process (not a second lock in the test's own process): the refusal must name that process's PID,
and killing it must free the run dir. It imports mora_train.core only (~0.2 s to start, no torch).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from mora_train.core.run_lock import RunDirLock
held = {}
for line in sys.stdin:
    verb, _, path = line.rstrip("\\n").partition(" ")
    if verb == "lock":
        held[path] = RunDirLock(path, "lock-holder").acquire()
    elif verb == "unlock":
        held.pop(path).release()
    print("ok", flush=True)
"""


class LockHolder:
    """`with LockHolder() as holder: holder.lock(run_dir) ...`; kill() ends it by SIGKILL, as a killed run ends."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def _send(self, verb: str, path: Path) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{verb} {path}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer == "ok", f"lock holder: {verb} {path} failed ({answer!r})"

    def lock(self, run_dir: Path) -> None:
        self._send("lock", run_dir)

    def unlock(self, run_dir: Path) -> None:
        self._send("unlock", run_dir)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

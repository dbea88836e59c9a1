"""One writer per run dir: an OS file lock that the writing process holds for its whole life.

The writer (a training run's main process, or `mode=eval` for its own output_dir) opens RUN_DIR/.mora-train.lock
and holds an exclusive flock(2) on it until it ends. The kernel drops the lock when the process dies, however it
dies, so a killed run never leaves a stale lock: the file a SIGKILL leaves behind holds none, and the next writer
takes it over. The holder writes its PID, host and command into the file, so whoever is refused can name it.
A writer that ends normally (a refused one included) deletes the file, so a refused run leaves no trace.

Readers (mode=eval, mora-train-export, mora-train-spectrum) probe the lock of the run they read, in the path
itself or any folder above it, and refuse a run still being written; mora-train-report lists it as running.

Why a lock file and not a lock on the folder itself: on NFS, where cluster sweeps keep their run dirs, a flock
on a directory is local to one machine, while a file's lock reaches the server.
Why a lock and not only a PID file: a PID outlives its process (reused, or on another machine); a lock does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mora_train.core.errors import MoraTrainError
from mora_train.core.run_dir import RunDir

log = logging.getLogger(__name__)

# A reader's probe holds a shared lock for microseconds; a writer that meets one tries again for this long
# before it concludes that another writer holds the run dir.
RETRY_S = 0.5
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: dict[Path, RunDirLock] = {}  # run dirs this process holds (a reader here is not refused by its own lock)


class RunDirBusy(MoraTrainError):
    """A second writer refused: another live process holds the run dir. Nothing may be written there on its
    behalf, not even an error record (the dir is the other run's)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run dir, as its lock file says (pid None when the file could not be read in time)."""

    pid: int | None
    host: str | None = None
    command: str | None = None
    started: str | None = None

    def describe(self) -> str:
        who = f"PID {self.pid}" if self.pid else "another process"
        if self.host and self.host != socket.gethostname():
            who += f" on {self.host}"
        details = [d for d in (self.command, f"started {self.started}" if self.started else None) if d]
        return who + (f" ({', '.join(details)})" if details else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


class RunDirLock:
    """The writer's lock on a run dir: acquire() before the first refusal that reads the dir, release() at the end."""

    def __init__(self, run_dir: str | Path, command: str = "mora-train") -> None:
        self.run_dir = Path(run_dir)
        self.command = command
        self._fd: int | None = None
        self._created_dir = False

    @property
    def path(self) -> Path:
        return RunDir(self.run_dir).lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Hold the lock, or raise MoraTrainError naming the process that does. Creates the run dir if needed
        (release() removes it again while it is empty)."""
        if self._fd is not None:
            return self
        try:
            if not self.run_dir.is_dir():
                self.run_dir.mkdir(parents=True)
                self._created_dir = True
        except OSError as err:
            raise MoraTrainError(
                f"cannot create the run dir {self.run_dir}: {err.strerror or err}; choose a writable "
                "location with output_dir=..."
            ) from None
        deadline = time.monotonic() + RETRY_S
        while self._fd is None:
            self._fd = self._try_lock()
            if self._fd is None:
                if time.monotonic() >= deadline:
                    self._forget_created_dir()
                    raise self._busy_error()
                time.sleep(0.02)
        _held[_key(self.run_dir)] = self
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def _try_lock(self) -> int | None:
        """The locked lock file's descriptor, or None while another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            self._forget_created_dir()
            raise MoraTrainError(
                f"cannot create the run-dir lock {self.path}: {err.strerror or err}; choose a "
                "writable location with output_dir=..."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                os.close(fd)
                self._forget_created_dir()
                raise MoraTrainError(
                    f"cannot lock {self.path}: {err.strerror or err}; choose another location with output_dir=..."
                ) from None
            log.warning(
                "the filesystem of %s does not support file locks (%s): a second run started on this "
                "run dir would not be refused",
                self.run_dir,
                err.strerror,
            )
            return fd
        if not _same_file(fd, self.path):  # the previous holder deleted the file as we opened it: take the new one
            os.close(fd)
            return None
        return fd

    def _busy_error(self) -> RunDirBusy:
        holder = _probe(self.run_dir) or Holder(None)
        return RunDirBusy(
            f"output_dir={self.run_dir} is being written by {holder.describe()}: two runs in one folder would "
            "overwrite each other's checkpoints and records. Wait until it ends (or stop it), then run again; or "
            "choose another output_dir=..."
        )

    def release(self) -> None:
        """Delete the lock file and drop the lock (a refused run leaves no trace); a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held.pop(_key(self.run_dir), None)
        try:
            if _same_file(fd, self.path):
                self.path.unlink()  # before unlocking: a writer that opened this file sees it gone and retries
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the lock
        self._forget_created_dir()

    def _forget_created_dir(self) -> None:
        if self._created_dir:
            self._created_dir = False
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only while empty: a run that wrote something keeps its folder

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _key(run_dir: Path) -> Path:
    return Path(os.path.realpath(run_dir))


def _read_holder(fd: int) -> Holder:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("pid"), int):
        return Holder(record["pid"], record.get("host"), record.get("command"), record.get("started"))
    return Holder(_pid_from_proc_locks(os.fstat(fd).st_ino))  # the holder has not written its record yet


def _pid_from_proc_locks(inode: int) -> int | None:
    """The PID the kernel lists for a flock on this inode (Linux /proc/locks), if any."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit():
            return int(fields[4])
    return None


def holder_of(run_dir: str | Path) -> Holder | None:
    """The live process writing run_dir, or None (no lock file, nobody holds it, or this process does)."""
    if _key(Path(run_dir)) in _held:
        return None
    return _probe(Path(run_dir))


def _probe(run_dir: Path) -> Holder | None:
    """Who holds run_dir's lock (a shared lock taken and dropped at once succeeds when nobody does)."""
    try:
        fd = os.open(RunDir(run_dir).lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:  # no locks on this filesystem: nothing can be known
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def writer_of(path: str | Path) -> tuple[Path, Holder] | None:
    """The run dir holding `path` (the path itself or a folder above it) that a live process is writing."""
    path = Path(os.path.abspath(os.path.expanduser(path)))
    for folder in (path, *path.parents):
        holder = holder_of(folder)
        if holder is not None:
            return folder, holder
    return None


def refuse_if_being_written(path: str | Path | None, option: str, command: str) -> None:
    """A reader's check: MoraTrainError when `path` belongs to a run that is still being written."""
    if path is None or not str(path).strip():
        return
    path = str(path)
    found = writer_of(path)
    if found is None:
        return
    run_dir, holder = found
    where = "" if _key(run_dir) == _key(Path(path).expanduser()) else f", in the run dir {run_dir},"
    named = f"{option}{path}" if option.endswith("=") else f"{option} {path}"
    raise MoraTrainError(
        f"{named}{where} is still being written by {holder.describe()}: its outputs may change or vanish "
        f"while {command} reads them. Wait until that run ends, or give a finished run"
    )

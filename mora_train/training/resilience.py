"""Graceful stops: SIGINT/SIGTERM end the run after the current optimizer step, a non-finite loss
stops it (or skips the step), and a full disk is reported as such.
"""

from __future__ import annotations

import errno
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "storagefull")


class NonFiniteLoss(Exception):
    """Raised inside the training loop, before the optimizer step that would apply a non-finite update."""

    def __init__(self, step: int, what: str) -> None:
        self.step, self.what = step, what
        super().__init__(f"non-finite {what} at step {step}")


class StopSignals:
    """While active, SIGINT/SIGTERM only record a request to stop; a second signal aborts at once.

    The training loop polls `requested()` after each optimizer step (see StopOnSignal).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal only works there
            for sig in HANDLED_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.received = signum
        print(
            f"\nmora-train: got {signal.Signals(signum).name}: finishing the current optimizer step and saving a "
            "checkpoint (send it again to stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> bool:
        """Whether any process got a stop signal (all processes must stop at the same step)."""
        local = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if local else 0], device=_collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return local


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StopOnSignal(TrainerCallback):
    """After a stop signal: save a checkpoint at the end of the current optimizer step, then end training."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is None and self.signals.requested():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


def _existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_parent(path)).free


def is_disk_full(err: BaseException, path: Path) -> bool:
    """Whether a failed write was (very probably) a full disk or quota.

    OSError carries errno ENOSPC; safetensors says "os error 28"; torch.save only says "unexpected pos"
    or "file write failed", so for other errors the disk's free space decides (less than 64 MiB or 1 %).
    """
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    if any(text in str(err).lower() for text in DISK_FULL_TEXTS):
        return True
    if not isinstance(err, (OSError, RuntimeError)) and type(err).__name__ != "SafetensorError":
        return False
    try:
        usage = shutil.disk_usage(_existing_parent(path))
    except OSError:
        return False
    return usage.free < min(64 << 20, usage.total // 100)


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"

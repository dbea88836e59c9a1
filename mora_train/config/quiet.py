"""Two warnings that optional packages print in every run, whether or not the run uses them: dropped.

transformers imports peft when it is installed, and peft imports bitsandbytes; the Trainer (through accelerate)
imports DeepSpeed when it is installed. Neither import can be avoided from here, and each prints a warning that
is noise or worse for a job that uses neither package:
- bitsandbytes (CPUs with AVX512-BF16) tries to fetch an optional CPU kernel from the Hub and reports that it
  "could not verify publisher trust status. Set trust_remote_code=True ...": about its kernel download, not the
  model, and no mora-train setting changes it; it then uses its built-in CPU code.
- DeepSpeed logs "Setting accelerator to CPU ... we were unable to detect it" on a machine without a GPU, where
  CPU is the right answer. On a machine with a visible GPU the message means something and is kept.
Only these two messages are dropped (a filter on each package's logger), nothing else the packages log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class DropMessage(logging.Filter):
    """Drops a logger's records that start with `prefix` (while `applies()` holds); lets every other one through."""

    def __init__(self, prefix: str, applies: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.prefix = prefix
        self.applies = applies

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(self.prefix) and self.applies())


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def quiet_optional_packages() -> None:
    """Install the two filters (once; the loggers exist before the packages create them, with these filters)."""
    for name, prefix, applies in (
        (BITSANDBYTES_CPU_LOGGER, BITSANDBYTES_KERNEL_NOTICE, lambda: True),
        (DEEPSPEED_LOGGER, DEEPSPEED_CPU_NOTICE, _no_gpu),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix, applies))


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """The logger `name` at `level` while the block runs, its own level back after (a package's chatter that the
    caller reports better itself)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)

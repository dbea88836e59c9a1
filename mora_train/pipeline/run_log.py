"""The run's log file, RUN_DIR/train.log: what is logged before the run dir may be written is held, then replayed.

The CLI holds records from the job's start (EarlyLog); run_dir.prepare_run_dir starts train.log once every refusal
has passed, so a refused run writes no log; the job's end closes it (detach_run_log).
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from mora_train.core.run_dir import RunDir


class EarlyLog(logging.handlers.MemoryHandler):
    """Holds what is logged before the run dir may be written; attach_run_log replays it into train.log."""

    def __init__(self) -> None:
        super().__init__(capacity=1 << 30, flushLevel=logging.CRITICAL + 1, target=None)

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


def attach_run_log(run_dir: Path) -> None:
    """Start RUN_DIR/train.log (appended to, like Hydra's job log) with the records held so far."""
    root = logging.getLogger()
    early = [h for h in root.handlers if isinstance(h, EarlyLog)]
    if not early and not any(isinstance(h, RunLogHandler) for h in root.handlers):
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return  # called from Python without the CLI: no run log
    handler = RunLogHandler(RunDir(run_dir).train_log)
    for buffer in early:
        for record in buffer.buffer:
            if record.levelno >= root.getEffectiveLevel():
                handler.handle(record)
        buffer.buffer.clear()
        root.removeHandler(buffer)
    for old in [h for h in root.handlers if isinstance(h, RunLogHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


class RunLogHandler(logging.FileHandler):
    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.setFormatter(logging.Formatter(LOG_FORMAT))


def detach_run_log() -> None:
    """End of a job: close train.log and drop anything still held (a refused run writes no log)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, (EarlyLog, RunLogHandler))]:
        root.removeHandler(handler)
        handler.close()

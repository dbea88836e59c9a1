"""User-facing errors: the CLI prints their message as one paragraph and exits non-zero, no traceback.

Exit codes (docs/errors.md has the same table):

| code | meaning |
|---|---|
| 0 | success |
| 1 | an unexpected error (a bug): one line on stderr, the traceback in a file whose path it names |
| 2 | a problem the user can fix: bad config, data, model, checkpoint or output location (MoraTrainError, ConfigError) |
| 3 | training stopped at a non-finite loss or gradient (RunStopped) |
| 4 | the disk filled up (RunStopped) |
| 5 | the merged checkpoint failed the merge check (adapter kept, metrics written) |
| 130 / 143 | stopped by SIGINT / SIGTERM after saving a checkpoint (RunStopped) |
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mora_train.core.run_dir import RunDir

T = TypeVar("T")

EXIT_UNEXPECTED = 1
EXIT_USER = 2
EXIT_NONFINITE = 3
EXIT_DISK_FULL = 4
EXIT_MERGE_CHECK = 5


# A value echoed into a message is shown whole up to this many characters. Longer ones are cut to their start
# and end: a paragraph must stay readable when a value is a pasted file or a runaway command substitution. The
# limit sits far above any real path or resume command line, which must stay whole to be pasted.
LONG_VALUE_CHARS = 1000
SHOWN_CHARS = 200  # what is left of a cut value: its first and last characters around the cut


def shorten(text: str, limit: int = LONG_VALUE_CHARS) -> str:
    """`text` itself, or its first and last characters around '…' and its length when longer than `limit`."""
    if len(text) <= limit:
        return text
    head, tail = SHOWN_CHARS * 3 // 4, SHOWN_CHARS // 4
    return f"{text[:head]}…{text[-tail:]} ({len(text):,} characters)"


# A run of characters without a space or quote, after the `key=` that may name it.
_LONG_VALUE = re.compile(rf"([^\s`'\"=]{{1,100}}=)?([^\s`'\"]{{{LONG_VALUE_CHARS + 1},}})")


def shorten_long_values(message: str) -> str:
    """Every over-long value in `message` shortened (see shorten): a run of characters without a space, and a
    line (a value with spaces, such as a prompt or a record)."""
    message = _LONG_VALUE.sub(lambda match: (match.group(1) or "") + shorten(match.group(2)), message)
    line_limit = 4 * LONG_VALUE_CHARS  # a list of known keys or layer names stays whole
    return "\n".join(shorten(line, line_limit) for line in message.split("\n"))


class MoraTrainError(Exception):
    """A problem the user can fix (bad config, missing file, unsupported device...).

    The message must name the bad value and say how to fix it. `exit_code` is what the CLI exits with.
    Over-long values in it are shortened here, the one place every user-facing error passes.
    """

    exit_code = EXIT_USER

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(shorten_long_values(str(message)))


class ConfigError(MoraTrainError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"invalid configuration ({len(self.problems)} {noun}):\n{lines}")


class RunStopped(MoraTrainError):
    """The run stopped before it finished (signal, non-finite loss, full disk); completed checkpoints are kept.

    `exit_code` is what the CLI exits with: 128 + signal number for SIGINT/SIGTERM, 3 for a non-finite
    loss, 4 for a full disk.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message, exit_code)


def package_hint(name: str, package: str, folder: object) -> str:
    """model.name_or_path not found inside model.package (which the model config may have set, not the user)."""
    return (
        f"`model.name_or_path={name}` is not a file of package {package} ({folder}): `model.package={package}` "
        "(set by the model config) makes name_or_path a path inside that package. For a hub id, a folder or a "
        "GGUF file of your own, add model.package=null (or pick a model config without a package, "
        "e.g. model=qwen2.5-0.5b)"
    )


def report_unexpected(program: str, err: BaseException, run_dir: Path | None) -> Path | None:
    """An unexpected error (a bug): one line on stderr naming the error and the file holding its traceback.

    The traceback goes to RUN_DIR/traceback.txt when the run dir exists, else to a temporary file."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path: Path | None = None
    try:
        if run_dir is not None and Path(run_dir).is_dir() and os.access(run_dir, os.W_OK):
            path = RunDir(run_dir).traceback
            path.write_text(text)
        else:
            fd, name = tempfile.mkstemp(prefix=f"{program}-traceback-", suffix=".txt")
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            path = Path(name)
    except OSError:
        path = None
    first = shorten_long_values(str(err).splitlines()[0]) if str(err) else "no message"
    where = f"the full traceback is in {path}" if path else "the traceback could not be written to a file"
    print(
        f"\n{program}: unexpected error ({type(err).__name__}: {first}); {where}. This is a bug or an unhandled "
        "case: please report it with that file",
        file=sys.stderr,
        flush=True,
    )
    return path


def run_command(program: str, work: Callable[[], T]) -> T:
    """Run a command's work: a MoraTrainError exits with its one paragraph and exit code, anything else with
    one line and a traceback file (report_unexpected) — never a bare traceback."""
    try:
        return work()
    except MoraTrainError as err:
        print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(getattr(err, "exit_code", EXIT_USER))
    except Exception as err:  # noqa: BLE001 - a bug or an unhandled case: one line and a traceback file
        report_unexpected(program, err, None)
        sys.exit(EXIT_UNEXPECTED)


# argparse types of the commands' numeric options: a bad value exits 2 with argparse's usage line, naming the
# option and the value, instead of failing later inside the work as an "unexpected error" (exit 1).
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shorten(text)!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shorten(text)!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value

"""User-facing errors: the CLI prints their message as one paragraph and exits non-zero, no traceback."""

from __future__ import annotations


class MoraTrainError(Exception):
    """A problem the user can fix (bad config, missing file, unsupported device...).

    The message must name the bad value and say how to fix it.
    """


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
        self.exit_code = exit_code
        super().__init__(message)

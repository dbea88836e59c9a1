"""The import layering declared in pyproject.toml ([tool.importlinter]) holds: `lint-imports` finds no violation."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lint_imports_command() -> list[str]:
    """The lint-imports console script beside this interpreter, else the same entry point through `python -c`."""
    script = Path(sys.executable).with_name("lint-imports")
    if script.is_file():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
    ]


def test_imports_follow_the_declared_layers() -> None:
    # A plain failure, not a skip: skipping would let violations through unnoticed.
    assert importlib.util.find_spec("importlinter"), (
        "import-linter is missing; install the dev extra: pip install -e '.[dev]'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [*lint_imports_command(), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports found imports that break the layering:\n{report}"

"""The code passes the project's linters as configured in pyproject.toml: `ruff check`, `ruff format --check`, `mypy`.

tests/unit/test_layering.py is the fourth check of the same kind: `lint-imports` holds the import layering. It fails
when import-linter is missing (the layering is the architecture); these skip when ruff or mypy is missing, since
the package runs without them: `pip install -e '.[dev]'` installs all four. .pre-commit-config.yaml runs the same
tools on each commit, so a finding shows up there before it fails here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINTED = ["mora_train", "tests", "benchmarks", "scripts"]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` in the repository (so pyproject.toml's settings apply); skip if it is not installed."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; install the dev extra: pip install -e '.[dev]'")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "check", "--output-format", "concise", *LINTED)
    assert result.returncode == 0, (
        f"ruff check found problems (`ruff check --fix` fixes some):\n{result.stdout}{result.stderr}"
    )


def test_code_is_formatted() -> None:
    result = run_tool("ruff", "format", "--check", "--output-format", "concise", *LINTED)
    assert result.returncode == 0, (
        f"files not formatted; run `ruff format {' '.join(LINTED)}`:\n{result.stdout}{result.stderr}"
    )


# mypy over the whole package: about 40-90 s on 2 cores with an empty cache (.mypy_cache/, as in a fresh clone),
# a few seconds with a warm one. Marked integration, so the inner loop (`-m "not integration and not slow"`)
# leaves it out; the default suite runs it.
@pytest.mark.integration
def test_mypy_finds_nothing() -> None:
    result = run_tool("mypy", "--config-file", str(REPO / "pyproject.toml"))
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"


MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
# The MoRA operators: one class per compression and decompression, each forward beside its adjoint, read as one table.
LONG_MODULES_ALLOWED = {"mora_train/adapters/mora/operators.py"}


def test_functions_and_modules_stay_short() -> None:
    """A function over 60 lines or a module over 400 is a sign to split by concern (the operators module excepted)."""
    import ast

    long_functions, long_modules = [], []
    for path in sorted((REPO / "mora_train").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES and relative not in LONG_MODULES_ALLOWED:
            long_modules.append(f"{relative} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    assert not long_modules and not long_functions, f"modules: {long_modules}; functions: {long_functions}"

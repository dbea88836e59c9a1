"""Every test in this folder is marked `integration`: `pytest -m "not integration and not slow"` is the inner loop."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Hooks in a folder's conftest see the whole session's items: mark only this folder's.
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)

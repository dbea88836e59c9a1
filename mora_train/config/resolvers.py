"""OmegaConf resolvers the shipped configs use; registered when the mora_train package is imported."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parent.parent.parent


def repo_relative(relative: str) -> str:
    """`${repo_dir:../shared/data}`: a path relative to the repository root, made absolute.

    Lets configs point at `../shared/data` (beside the repository) whatever directory mora-train runs from.
    """
    return os.path.normpath(REPO_DIR / relative)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", repo_relative)

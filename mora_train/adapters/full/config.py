"""adapter=full's keys: target_modules may be `all` (every parameter trains)."""

from __future__ import annotations

from typing import Literal

from mora_train.adapters.config import AdapterSettings
from mora_train.config.schema import setting


class FullSettings(AdapterSettings):
    """adapter=full: every targeted weight trains (target_modules=all: every parameter)."""

    target_modules: list[str] | Literal["all"] = setting(
        default="all", help="all: every parameter trains; a list of linear-layer names: only those layers"
    )

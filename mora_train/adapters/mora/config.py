"""adapter=mora's keys beside the shared ones (adapters/config.py)."""

from __future__ import annotations

from typing import Any

from mora_train.adapters.config import LowRankSettings
from mora_train.adapters.mora.types import AUTO, resolve_mora_type
from mora_train.config.schema import setting


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


class MoraSettings(LowRankSettings):
    """adapter=mora: square-matrix high-rank updating."""

    mora_type: str | int = setting(
        default="rope",
        help="compression/decompression pair: rope, sharing, grouping (or 1-6, the paper's numbering), auto",
    )

    def check(self, prefix: str) -> list[str]:
        problems = super().check(prefix)
        if not is_auto(self.mora_type):  # auto is checked with the rank (MoraAdapter.config_problems)
            try:
                resolve_mora_type(self.mora_type)
            except ValueError as err:
                problems.append(f"`{prefix}.mora_type`: {err}; or {prefix}.mora_type=auto (chosen by rank)")
        return problems

"""adapter=lora's keys beside the shared ones (adapters/config.py)."""

from __future__ import annotations

from mora_train.adapters.config import LowRankSettings
from mora_train.config.schema import setting


class LoraSettings(LowRankSettings):
    """adapter=lora: peft's LoRA."""

    alpha: float = setting(default=16, help="LoRA's scaling numerator: ΔW = (alpha / rank) B A")

    def check(self, prefix: str) -> list[str]:
        problems = super().check(prefix)
        if self.alpha <= 0:
            problems.append(f"`{prefix}.alpha={self.alpha:g}` must be positive")
        return problems

"""The `adapter` section's shared keys; each method's own settings class (beside the method) adds its keys.

`adapter.name` picks the class (ADAPTER_TYPES[name].settings_type), so an unknown key is refused for the
method it does not belong to (`adapter.alpha` with adapter=mora).
"""

from __future__ import annotations

from typing import Literal, Protocol

from mora_train.config.schema import Section, setting
from mora_train.core.errors import MoraTrainError


class RestartView(Protocol):
    """What the adapter checks read of `trainer.restart` (training/config.py's RestartConfig; the adapters layer
    sits below training, so it names the fields it reads instead of importing the class)."""

    @property
    def every_steps(self) -> int: ...

    @property
    def mora_types(self) -> list[str | int] | None: ...


class TrainerView(Protocol):
    """What the adapter checks read of the `trainer` section (training/config.py's TrainerConfig)."""

    @property
    def restart(self) -> RestartView: ...

    @property
    def train_embeddings(self) -> bool: ...

    @property
    def adapter_lr_ratio(self) -> float | None: ...


class AdapterSettings(Section):
    name: str = setting(help="the method: lora, mora or full (chosen by adapter=NAME)")
    target_modules: list[str] | Literal["all"] = setting(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="the linear layers (by name suffix) the method adapts",
    )

    def check(self, prefix: str) -> list[str]:
        targets = self.target_modules
        if isinstance(targets, list) and (not targets or not all(targets)):
            return [f"`{prefix}.target_modules={targets}` must be a non-empty list of module names"]
        return []


class LowRankSettings(AdapterSettings):
    """Keys of the methods that add trainable weights beside frozen base layers (LoRA, MoRA)."""

    dropout: float = setting(default=0.0, help="dropout on the adapter's input")

    @property
    def target_names(self) -> list[str]:
        """target_modules as the list these methods need (`all` is refused by check, so only a caller that
        skipped the config check sees this error)."""
        if isinstance(self.target_modules, str):
            raise MoraTrainError(
                f"`adapter.target_modules={self.target_modules}` must be a list of module names, e.g. [q_proj, v_proj]"
            )
        return list(self.target_modules)

    def check(self, prefix: str) -> list[str]:
        problems = super().check(prefix)
        if self.target_modules == "all":
            problems.append(f"`{prefix}.target_modules=all` must be a list of module names, e.g. [q_proj, v_proj]")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"`{prefix}.dropout={self.dropout:g}` must be in [0, 1)")
        return problems

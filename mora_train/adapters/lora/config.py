"""adapter=lora's keys beside the shared ones (adapters/config.py): peft's LoRA and its family (rsLoRA, DoRA,
PiSSA / OLoRA initialisation), each a key of the same section so that one sweep can mix them."""

from __future__ import annotations

import re

from mora_train.adapters.config import LowRankSettings
from mora_train.config.schema import setting

# `alpha: 2r`: alpha as a multiple of the rank (`r` alone: 1 x rank).
ALPHA_PER_RANK = re.compile(r"^(?P<k>\d+(\.\d*)?|\.\d+)?r$")
# peft's initialisations mora-train runs: default (A random, B zero), gaussian (A ~ N(0, 1/r)), orthogonal
# (A and B from an orthogonal matrix, ΔW != 0 from the start), pissa / pissa_niter_K (A, B from the top singular
# directions of W, and W replaced by the residual) and olora (A, B from a QR of W, W replaced likewise).
LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_K", "olora")
PISSA_NITER = re.compile(r"^pissa_niter_\d+$")
# Inits that replace W by a residual W - s B0 A0 (adapter/ is then saved as a LoRA on the original weights).
RESIDUAL_INITS = ("pissa", "olora")
# peft's other initialisations, and why mora-train does not run them.
REFUSED_INITS = {
    "eva": "it is data-driven (peft's initialize_lora_eva_weights runs the training data through the model first)",
    "corda": "it needs a covariance pass over data (peft's preprocess_corda) before the adapter is built",
    "loftq": "it quantizes the base itself (needs a loftq_config); use model.quantization with init=default instead",
    "lora_ga": "it needs gradients of the training data before the adapter is built",
    "mica": "it freezes B, so it trains half of LoRA's parameters and breaks the equal-budget comparison",
}


def is_residual_init(init: str) -> bool:
    """Whether `init` replaces the base weights by a residual (PiSSA, OLoRA)."""
    return init.startswith(RESIDUAL_INITS)


class LoraSettings(LowRankSettings):
    """adapter=lora: peft's LoRA, with rsLoRA scaling, DoRA and PiSSA / OLoRA initialisation as options."""

    alpha: float | str = setting(
        default=16,
        help="LoRA's scaling numerator: a number, or a multiple of the rank such as `2r` (alpha = 2 x rank)",
    )
    use_rslora: bool = setting(
        default=False, help="rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank"
    )
    use_dora: bool = setting(
        default=False,
        help="DoRA: W' = m (W + s B A) / ||W + s B A|| per output row; trains a magnitude m (d_out values) per layer",
    )
    init: str = setting(
        default="default",
        help="how A and B start: default, gaussian, orthogonal, pissa, pissa_niter_K (fast SVD, K iterations), olora",
    )

    def alpha_for(self, rank: int) -> float:
        """alpha as a number: itself, or its multiple of `rank` (`2r` at rank 8: 16)."""
        if isinstance(self.alpha, str):
            match = ALPHA_PER_RANK.match(self.alpha.strip())
            factor = float(match.group("k")) if match and match.group("k") else 1.0
            return factor * rank
        return float(self.alpha)

    def check(self, prefix: str) -> list[str]:
        problems = super().check(prefix)
        if isinstance(self.alpha, str):
            match = ALPHA_PER_RANK.match(self.alpha.strip())
            if match is None or (match.group("k") is not None and float(match.group("k")) <= 0):
                problems.append(
                    f"`{prefix}.alpha={self.alpha}` must be a positive number (16) or a positive multiple of the "
                    "rank written like 2r or 0.5r"
                )
        elif self.alpha <= 0:
            problems.append(f"`{prefix}.alpha={self.alpha:g}` must be positive")
        problems += self._init_problems(prefix)
        return problems

    def _init_problems(self, prefix: str) -> list[str]:
        init = self.init
        if init in REFUSED_INITS:
            return [
                (
                    f"`{prefix}.init={init}` is not supported by mora-train: {REFUSED_INITS[init]}; use one of "
                    f"{', '.join(LORA_INITS)}"
                )
            ]
        if (init not in LORA_INITS and not PISSA_NITER.match(init)) or init == "pissa_niter_K":
            return [f"`{prefix}.init={init}` is unknown; use one of {', '.join(LORA_INITS)} (K a whole number)"]
        if self.use_dora and is_residual_init(init):
            return [
                (
                    f"`{prefix}.init={init}` with `{prefix}.use_dora=true`: {init} replaces the base weights by a "
                    "residual, and its adapter is saved as a LoRA on the original weights, which has no place for "
                    f"DoRA's magnitude; use one of them (e.g. {prefix}.init=default with DoRA)"
                )
            ]
        return []

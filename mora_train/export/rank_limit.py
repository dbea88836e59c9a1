"""How to fit an export under a serving engine's largest LoRA rank (vLLM's `--max-lora-rank` is at most 512).

An exact export of MoRA's chunked types (rope, decouple) has the numerical rank of ΔW, up to min(d_in, d_out):
576 on SmolLM2's square projections, above vLLM's limit. Truncating it costs accuracy; this says how much, from
each layer's singular values: the largest `--energy` that keeps every layer at or below the limit (the fewest
singular values holding that share of the layer's ΔW energy, adapters.base.singular_values_kept), and the
relative Frobenius error of ΔW it leaves (max over layers), next to the error of `--rank LIMIT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mora_train.adapters.base import singular_values_kept

VLLM_LARGEST_MAX_LORA_RANK = 512
ENERGY_DECIMALS = 4  # the --energy printed is rounded down to this many decimals, so that it still fits


@dataclass
class RankFit:
    limit: int
    energy: float | None  # the largest --energy whose export keeps every layer at most `limit` (None: none does)
    energy_max_relative_error: float | None  # its relative Frobenius error of ΔW, worst layer
    rank_max_relative_error: float  # --rank LIMIT's, worst layer


def relative_error_at(S: torch.Tensor, kept: int) -> float:
    """||ΔW - its best rank-`kept` approximation||_F / ||ΔW||_F from ΔW's singular values `S`."""
    energy = S.double() ** 2
    total = float(energy.sum())
    return math.sqrt(float(energy[kept:].sum()) / total) if total > 0 else 0.0


def energy_bound(S: torch.Tensor, limit: int) -> float:
    """The largest energy share whose kept count is at most `limit` for this layer (1.0 when it has no more)."""
    if S.numel() <= limit:
        return 1.0
    energy = S.double() ** 2
    return float(energy[:limit].sum() / energy.sum().clamp_min(torch.finfo(torch.float64).tiny))


def fit_under_rank_limit(spectra: list[torch.Tensor], limit: int = VLLM_LARGEST_MAX_LORA_RANK) -> RankFit:
    """The --energy and --rank exports that fit `limit`, with their errors (the module docstring)."""
    scale = 10**ENERGY_DECIMALS
    energy = math.floor(min(energy_bound(S, limit) for S in spectra) * scale) / scale
    energy_error = None
    if energy > 0:
        energy_error = max(relative_error_at(S, singular_values_kept(S, energy=energy)) for S in spectra)
    rank_error = max(relative_error_at(S, min(limit, S.numel())) for S in spectra)
    return RankFit(limit, energy if energy > 0 else None, energy_error, rank_error)

"""An adapter as a standard PEFT LoRA folder, for peft, vLLM, SGLang and LoRAX (`mora-train-export`).

Methods with the HasLoraFactors capability (adapters/capabilities.py) give every adapted layer as exact LoRA
factors ΔW = B @ A:
for MoRA's summing types and truncation A = M C and B = D (rank r̂, exact by construction), for its
chunked types (rope, decouple) the SVD of ΔW at its numerical rank. Here they are, optionally,
truncated to `rank` singular values or to a fraction `energy` of each layer's ΔW energy (the SVD of B @ A
through QR of the factors: O((d_in + d_out) k²), never the d_out x d_in product), and written with the tensor
names and config keys peft writes itself, in the dtype asked for.

Each layer keeps its own rank: `r` is the largest, and peft's `rank_pattern` names every layer of another rank,
with `alpha_pattern` giving it lora_alpha = its rank, so that the scaling alpha / r is exactly 1 on every layer
(`lora_alpha = r` for the rest). An engine that ignores the patterns and scales every layer by the global
lora_alpha / r also gets 1, so the maths stay exact wherever the per-layer tensors load (vLLM copies each into its
max-rank buffer by the tensor's own shape). `uniform_rank` zero-pads every layer to `r` instead, for engines that
take one rank per adapter (SGLang copies every layer's factors into `[:r]` of its buffer); the padded directions
add exactly 0 to ΔW.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mora_train.adapters.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, singular_values_kept
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically, write_json_atomically, write_text_atomically
from mora_train.export.rank_limit import VLLM_LARGEST_MAX_LORA_RANK, fit_under_rank_limit

PEFT_PREFIX = "base_model.model."
# vLLM's LoRAConfig accepts these max_lora_rank values (vllm/config/lora.py, `MaxLoRARanks`); an adapter
# whose r exceeds the server's max_lora_rank is refused by vLLM's PEFTHelper.validate_legal.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
REPORT_JSON = "export_report.json"
REPORT_MD = "export_report.md"


@dataclass
class LayerExport:
    name: str
    d_out: int
    d_in: int
    exact_rank: int  # rank of the exact factors (r̂ for MoRA's summing types)
    rank: int  # rank kept in the export
    relative_error: float  # ||ΔW - B'A'||_F / ||ΔW||_F (0 for an exact export)


def _product_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Qb, U, S, Vh, Qa) with B @ A = (Qb U) diag(S) (Qa Vh^T)^T, in float64, through QR of the factors."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return Qb, U, S, Vh, Qa


def singular_values(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The singular values of B @ A, descending (float64)."""
    return _product_svd(B, A)[2]


def truncate(
    B: torch.Tensor, A: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B', A', relative Frobenius error) keeping the top singular directions of B @ A.

    How many: adapters.base.singular_values_kept (neither rank nor energy: the numerical rank of B @ A, exact
    to float32 rounding and never wider than min(d_in, d_out)).
    """
    Qb, U, S, Vh, Qa = _product_svd(B, A)
    total = float((S**2).sum())
    k = singular_values_kept(S, rank, energy)
    dropped = float((S[k:] ** 2).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    B_new = (Qb @ U[:, :k]) * S[:k]
    A_new = (Qa @ Vh[:k].T).T
    return B_new.float().contiguous(), A_new.float().contiguous(), error


def peft_config(
    rank: int, target_modules: list[str], base_model: str | None, rank_pattern: dict[str, int] | None = None
) -> dict[str, Any]:
    """adapter_config.json as peft's LoraConfig writes it, scaling lora_alpha / r = 1 on every layer (alpha_pattern
    = rank_pattern) — peft keys only: peft warns about any other key as if the folder came from a newer peft
    (provenance is in export_report.json). rank_pattern keys are full module names (peft matches a key against a
    module name's dotted suffix)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(rank_pattern or {}),
        "inference_mode": True,
    }


def check_truncation(rank: int | None, energy: float | None) -> None:
    """Refuse a --rank that is not a positive integer or an --energy outside (0, 1]."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise MoraTrainError(f"--rank {rank!r} must be a positive integer (the LoRA rank to keep per layer)")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise MoraTrainError(f"--energy {energy!r} must be in (0, 1]: the share of each layer's ΔW energy to keep")


def _kept_factors(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int | None, energy: float | None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[LayerExport]]:
    """Each layer's factors as exported (truncated where asked, or where wider than the layer) and its table row."""
    rows: list[LayerExport] = []
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (B_exact, A_exact) in factors.items():
        d_out, d_in, exact_rank = B_exact.shape[0], A_exact.shape[1], A_exact.shape[0]
        needs_cut = rank is not None or energy is not None or exact_rank > min(d_in, d_out)
        if needs_cut:
            B, A, error = truncate(B_exact, A_exact, rank, energy)
        else:
            B, A, error = B_exact, A_exact, 0.0
        kept[name] = (B.cpu(), A.cpu())
        rows.append(LayerExport(name, d_out, d_in, exact_rank, A.shape[0], error))
    return kept, rows


def _tensors(
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]], width: int | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """peft's tensor names and shapes: each layer at its own rank, or zero-padded to `width` (added exactly 0)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (B, A) in kept.items():
        k = A.shape[0]
        A_out = torch.zeros(width, A.shape[1], dtype=torch.float32) if width else A.clone()
        B_out = torch.zeros(B.shape[0], width, dtype=torch.float32) if width else B.clone()
        A_out[:k], B_out[:, :k] = A, B
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A_out.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B_out.to(dtype).contiguous()
    return tensors


def export_lora(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    out_dir: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base_model: str | None = None,
    source: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    uniform_rank: bool = False,
) -> list[LayerExport]:
    """Write `factors` (module name -> (B, A), ΔW = B @ A) as a PEFT LoRA folder; return the per-layer table.

    rank / energy truncate (each layer keeps at most `rank`, or the singular values holding `energy` of
    its ΔW energy); without them every layer is exported exactly (to float32 rounding). The weights are written in
    `dtype`; each layer at its own rank (rank_pattern), or all zero-padded to the largest with `uniform_rank`. An
    export wider than vLLM's largest --max-lora-rank records in its report the truncations that would fit
    (mora_train.export.rank_limit).
    """
    check_truncation(rank, energy)
    if not factors:
        raise MoraTrainError("the adapter has no adapted layers to export")
    kept, rows = _kept_factors(factors, rank, energy)
    top = max(row.rank for row in rows)
    pattern = {} if uniform_rank else {row.name: row.rank for row in rows if row.rank != top}
    tensors = _tensors(kept, top if uniform_rank else None, dtype)
    config = peft_config(top, sorted({name.rsplit(".", 1)[-1] for name in kept}), base_model, pattern)
    table: dict[str, Any] = {
        "rank": top,
        "uniform_rank": uniform_rank,
        "dtype": str(dtype).removeprefix("torch."),
        "truncation": {"rank": rank, "energy": energy},
        "source": source or {},
        "layers": [asdict(r) for r in rows],
    }
    if top > VLLM_LARGEST_MAX_LORA_RANK:
        fit = fit_under_rank_limit([singular_values(B, A) for B, A in factors.values()])
        table["rank_limit_fit"] = asdict(fit)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json_atomically(tmp / ADAPTER_CONFIG_NAME, config)
        write_json_atomically(tmp / REPORT_JSON, table)
        write_text_atomically(tmp / REPORT_MD, report_markdown(rows, top, uniform_rank))

    write_dir_atomically(Path(out_dir), write)
    return rows


def report_markdown(rows: list[LayerExport], top: int, uniform_rank: bool = False) -> str:
    shape = (
        f"rank {top}, every layer zero-padded to it (lora_alpha = r: scaling 1)"
        if uniform_rank
        else f"each layer at its own rank, up to {top} (rank_pattern, lora_alpha = rank per layer: scaling 1)"
    )
    lines = [
        f"# LoRA export: {shape}",
        "",
        "| layer | d_out x d_in | exact rank | exported rank | relative Frobenius error |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.d_out} x {r.d_in} | {r.exact_rank} | {r.rank} | {r.relative_error:.2e} |" for r in rows]
    return "\n".join(lines) + "\n"


def summarize(rows: list[LayerExport], uniform_rank: bool = False) -> dict[str, Any]:
    """One line's worth: worst and mean relative error, ranks, parameter count (as stored: padded or not)."""
    errors = [r.relative_error for r in rows]
    top = max(r.rank for r in rows)
    return {
        "layers": len(rows),
        "max_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "exact_ranks": sorted({r.exact_rank for r in rows}),
        "exported_ranks": sorted({r.rank for r in rows}),
        "lora_params": sum((top if uniform_rank else r.rank) * (r.d_in + r.d_out) for r in rows),
        "vllm_max_lora_rank": vllm_max_lora_rank(top),
    }


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves rank `rank` (None: above vLLM's largest)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)

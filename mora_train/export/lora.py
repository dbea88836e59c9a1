"""An adapter as a standard PEFT LoRA folder, for peft, vLLM, SGLang and LoRAX (`mora-train-export`).

Methods with the HasLoraFactors capability (adapters/capabilities.py) give every adapted layer as exact LoRA
factors ΔW = B @ A:
for MoRA's summing types and truncation A = M C and B = D (rank r̂, exact by construction), for its
chunked types (rope, decouple) the SVD of ΔW at its numerical rank. Here they are, optionally,
truncated to `rank` singular values or to a fraction `energy` of each layer's ΔW energy (the SVD of B @ A
through QR of the factors: O((d_in + d_out) k²), never the d_out x d_in product), zero-padded to one
rank for the whole folder (serving engines take one `r` per adapter) and written with the tensor names
and config keys peft writes itself, `lora_alpha = r` so that peft's scaling alpha / r is exactly 1.
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


def truncate(
    B: torch.Tensor, A: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B', A', relative Frobenius error) keeping the top singular directions of B @ A.

    How many: adapters.base.singular_values_kept (neither rank nor energy: the numerical rank of B @ A, exact
    to float32 rounding and never wider than min(d_in, d_out)).
    """
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    total = float((S**2).sum())
    k = singular_values_kept(S, rank, energy)
    dropped = float((S[k:] ** 2).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    B_new = (Qb @ U[:, :k]) * S[:k]
    A_new = (Qa @ Vh[:k].T).T
    return B_new.float().contiguous(), A_new.float().contiguous(), error


def peft_config(rank: int, target_modules: list[str], base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as peft's LoraConfig writes it, scaling lora_alpha / r = 1 — peft keys only: peft
    warns about any other key as if the folder came from a newer peft (provenance is in export_report.json)."""
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
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def check_truncation(rank: int | None, energy: float | None) -> None:
    """Refuse a --rank that is not a positive integer or an --energy outside (0, 1]."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise MoraTrainError(f"--rank {rank!r} must be a positive integer (the LoRA rank to keep per layer)")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise MoraTrainError(f"--energy {energy!r} must be in (0, 1]: the share of each layer's ΔW energy to keep")


def export_lora(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    out_dir: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base_model: str | None = None,
    source: dict[str, Any] | None = None,
) -> list[LayerExport]:
    """Write `factors` (module name -> (B, A), ΔW = B @ A) as a PEFT LoRA folder; return the per-layer table.

    rank / energy truncate (each layer keeps at most `rank`, or the singular values holding `energy` of
    its ΔW energy); without them every layer is exported exactly (to float32 rounding).
    """
    check_truncation(rank, energy)
    if not factors:
        raise MoraTrainError("the adapter has no adapted layers to export")
    rows: list[LayerExport] = []
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (B_exact, A_exact) in factors.items():
        d_out, d_in, exact_rank = B_exact.shape[0], A_exact.shape[1], A_exact.shape[0]
        needs_cut = rank is not None or energy is not None or exact_rank > min(d_in, d_out)
        if needs_cut:
            B, A, error = truncate(B_exact, A_exact, rank, energy)
        else:
            B, A, error = B_exact, A_exact, 0.0
        kept[name] = (B, A)
        rows.append(LayerExport(name, d_out, d_in, exact_rank, A.shape[0], error))
    uniform = max(row.rank for row in rows)
    tensors: dict[str, torch.Tensor] = {}
    for name, (B, A) in kept.items():
        k = A.shape[0]
        # Zero-padded to the folder's one rank: padded directions add exactly 0 to ΔW.
        A_full = torch.zeros(uniform, A.shape[1], dtype=torch.float32)
        B_full = torch.zeros(B.shape[0], uniform, dtype=torch.float32)
        A_full[:k], B_full[:, :k] = A.cpu(), B.cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A_full.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B_full.contiguous()
    targets = sorted({name.rsplit(".", 1)[-1] for name in kept})
    config = peft_config(uniform, targets, base_model)
    table = {
        "rank": uniform,
        "truncation": {"rank": rank, "energy": energy},
        "source": source or {},
        "layers": [asdict(r) for r in rows],
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json_atomically(tmp / ADAPTER_CONFIG_NAME, config)
        write_json_atomically(tmp / REPORT_JSON, table)
        write_text_atomically(tmp / REPORT_MD, report_markdown(rows, uniform))

    write_dir_atomically(Path(out_dir), write)
    return rows


def report_markdown(rows: list[LayerExport], uniform: int) -> str:
    lines = [
        f"# LoRA export: rank {uniform} (lora_alpha = r: scaling 1)",
        "",
        "| layer | d_out x d_in | exact rank | exported rank | relative Frobenius error |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.d_out} x {r.d_in} | {r.exact_rank} | {r.rank} | {r.relative_error:.2e} |" for r in rows]
    return "\n".join(lines) + "\n"


def summarize(rows: list[LayerExport]) -> dict[str, Any]:
    """One line's worth: worst and mean relative error, ranks, parameter count."""
    errors = [r.relative_error for r in rows]
    return {
        "layers": len(rows),
        "max_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "exact_ranks": sorted({r.exact_rank for r in rows}),
        "exported_ranks": sorted({r.rank for r in rows}),
        "lora_params": sum(max(x.rank for x in rows) * (r.d_in + r.d_out) for r in rows),
        "vllm_max_lora_rank": vllm_max_lora_rank(max(r.rank for r in rows)),
    }


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves rank `rank` (None: above vLLM's largest)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)

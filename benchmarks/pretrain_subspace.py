#!/usr/bin/env python
"""Where each method's update can go: the share of a target matrix that a rank-r LoRA and MoRA can represent.

MoRA's sharing and grouping types (the two types ReMoRA cycles) write ΔW = D M C with fixed 0/1 maps: C sums the
d_in input features into r̂ groups and D copies r̂ outputs onto the d_out rows (``MoRALinear.lora_factors``). So
whatever M learns, ΔW keeps its columns in col(D) and its rows in row(C), two subspaces fixed before training. The
best MoRA update towards a target T is P_D T P_C (orthogonal projectors), and the share of T's energy (squared
Frobenius norm) it can represent is ||P_D T P_C||² / ||T||². LoRA's ΔW = B A is any rank-r matrix, found while
training; its best is T's top-r SVD truncation, with share (sum of the r largest squared singular values) / ||T||².

Targets, for every adapted layer of bench_pretrain.py's model (random init; hidden 256, 4 layers at full size),
averaged per layer kind:
- the gradient of the pretraining loss at the random base, summed over --batches batches of the training text;
- a random Gaussian matrix of the layer's shape (a reference: what the shares are when nothing is aligned);
- with --runs, each finished run's ΔW (merged − base), e.g. the LoRA and MoRA runs of bench_pretrain.py, at
  the run's own rank.

    python benchmarks/pretrain_subspace.py --ranks 16 64
    python benchmarks/pretrain_subspace.py --ranks 16 --runs benchmarks/runs/pretrain/full/lora-lr0.003-steps1600
    python benchmarks/pretrain_subspace.py --quick      # tiny model, one batch: checks the script (seconds)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_pretrain import overrides, settings
from harness import compose

SHARES = ("top-r (LoRA's best)", "MoRA sharing", "MoRA grouping")


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column space of `matrix` (float64)."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, s > s.max() * 1e-10]


def mora_bases(d_out: int, d_in: int, rank: int, mora_type: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Orthonormal bases of col(D) and row(C) of the MoRA layer of this shape, and its r̂."""
    from mora_train.adapters.mora.layer import MoRALinear

    layer = MoRALinear(torch.nn.Linear(d_in, d_out, bias=False), rank, mora_type)
    with torch.no_grad():
        layer.mora_M.copy_(torch.eye(layer.r_hat))
    factors = layer.lora_factors()
    if factors is None:
        raise SystemExit(f"MoRA type {mora_type} has no ΔW = D M C form; use sharing or grouping")
    decompression, compression = factors  # B = D, A = I C = C
    return orthonormal_columns(decompression), orthonormal_columns(compression.T), layer.r_hat


def shares(target: torch.Tensor, rank: int, bases: dict[str, tuple[torch.Tensor, torch.Tensor, int]]) -> list[float]:
    """[top-r share, then the share inside each MoRA type's subspace] of target's squared Frobenius norm."""
    t = target.double()
    energy = t.square().sum()
    sigma = torch.linalg.svdvals(t)
    values = [float(sigma[:rank].square().sum() / energy)]
    for rows, cols, _ in bases.values():
        values.append(float((rows.T @ t @ cols).square().sum() / energy))
    return values


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj")
    }


def base_and_gradients(args: list[str], batches: int, batch_size: int) -> tuple[torch.nn.Module, dict]:
    """The random base of these overrides and the gradient of its training loss per adapted weight."""
    from mora_train.models import load_model_and_tokenizer
    from mora_train.tasks import TASKS

    cfg = compose(args)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    data = TASKS[cfg.task.name].build(cfg.task, tokenizer, cfg.trainer.max_seq_len)
    blocks = [data.train[i]["input_ids"] for i in range(batches * batch_size)]
    model.train()
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size])
        model(input_ids=ids, labels=ids).loss.backward()
    return model, {name: layer.weight.grad.detach().clone() for name, layer in linear_layers(model).items()}


def run_rank(run: Path) -> int:
    """The adapter rank a finished mora-train run trained with (its metrics.json)."""
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise SystemExit(f"--runs {run}: no metrics.json there; give the folder of a finished mora-train run")
    return int(json.loads(metrics.read_text())["rank"])


def run_deltas(run: Path, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from mora_train.export.delta import merged_deltas

    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    return merged_deltas(base, merged, layers=linear_layers(base))


def table(title: str, targets: dict[str, torch.Tensor], rank: int, cache: dict) -> str:
    """Mean shares per layer kind for one kind of target at one rank."""
    per_kind: dict[str, list[list[float]]] = {}
    layout: dict[str, tuple[int, int, int]] = {}  # layer kind -> d_out, d_in, r̂ (one shape per kind)
    for name, target in targets.items():
        d_out, d_in = target.shape
        key = (d_out, d_in, rank)
        if key not in cache:
            cache[key] = {t: mora_bases(d_out, d_in, rank, t) for t in ("sharing", "grouping")}
        kind = name.rsplit(".", 1)[-1]
        per_kind.setdefault(kind, []).append(shares(target, rank, cache[key]))
        layout[kind] = (d_out, d_in, cache[key]["sharing"][2])
    lines = [
        f"**{title}, r = {rank}** (share of the target's squared norm each can represent; mean over layers)\n",
        "| layer kind | shape | r̂ | " + " | ".join(SHARES) + " |",
        "|---|---|---:|" + "---:|" * len(SHARES),
    ]
    for kind, rows in sorted(per_kind.items()):
        d_out, d_in, r_hat = layout[kind]
        means = [sum(col) / len(col) for col in zip(*rows, strict=True)]
        lines.append(f"| {kind} | {d_out} x {d_in} | {r_hat} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bench_pretrain's tiny model and one batch")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batches", type=int, default=4, help="training batches summed into the gradient")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="finished bench_pretrain run folders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the tables to this markdown file (a new file)"
    )
    opts = parser.parse_args()
    if opts.out is not None and opts.out.exists():
        raise SystemExit(f"--out {opts.out}: that file exists; name a new file (this script never overwrites one)")
    torch.set_num_threads(opts.threads)
    s = settings(opts.quick)
    s["quick"] = opts.quick
    args = overrides("lora", s, 3e-3)
    batches = 1 if opts.quick else opts.batches
    run_ranks = {run: run_rank(run) for run in opts.runs}  # a bad folder fails before the gradients
    base, gradients = base_and_gradients(args, batches, s["batch"])
    generator = torch.Generator().manual_seed(0)
    gaussian = {n: torch.randn(g.shape, generator=generator) for n, g in gradients.items()}
    cache: dict = {}
    sections = []
    for rank in opts.ranks:
        sections.append(
            table(f"Gradient at the random base ({batches * s['batch']} sequences)", gradients, rank, cache)
        )
        sections.append(table("Gaussian matrix (reference)", gaussian, rank, cache))
        own_rank = [run for run in opts.runs if run_ranks[run] == rank]  # a run's ΔW against its own rank's subspaces
        sections.extend(table(f"ΔW of {run.name}", run_deltas(run, base), rank, cache) for run in own_rank)
    report = "\n\n".join(sections)
    print(report)
    if opts.out is not None:
        from mora_train.core.io import write_text_atomically

        write_text_atomically(opts.out, report + "\n")


if __name__ == "__main__":
    main()

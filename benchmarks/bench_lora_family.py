#!/usr/bin/env python
"""MoRA against the LoRA family at an equal budget, with seeds: UUID memorization (paper Fig. 3) on SmolLM2-135M.

Methods (rank 8 each, equal trainable parameters; DoRA adds d_out magnitudes per layer): MoRA rope (type 6),
MoRA sharing (type 1), LoRA, rsLoRA, DoRA and PiSSA, through mora-train's own trainer (the composed config of
`mora-train task=uuid adapter=... rank=8`; the setting of benchmarks/bench_memorization.py: 32 pairs, 60 steps of 8,
cosine schedule, greedy generation over all keys every 15 steps).

1. Learning rate, seed 0: each method on a small grid of half-decade rates (DEFAULT_GRID). The grid is
   *bracketed*: while the best rate (final char accuracy, then final loss) sits at an edge of its grid, the next
   rate beyond that edge is added (at most --max-extend times per method), so the chosen rate has a worse rate on
   either side, or the report says it has not.
2. Seeds: every method at its best rate with --seeds seeds (seed 0 is the grid's run). The seed changes the
   adapter's initialisation (LoRA's A; MoRA's M and PiSSA's factors start the same every time) and the data order.
3. Results (OUT/{quick,full}/): results.md with the grid table, the mean ± 95 % Student-t interval of each metric
   over the seeds (mora_train.analysis.stats), the difference to LoRA paired by seed, and the curves;
   results.json; accuracy_vs_step.png (mean over seeds, 95 % band).

Every finished run is kept in OUT/.../METHOD_lrLR_seedS/record.json and reused by a later call with the same
settings, so an interrupted benchmark resumes where it stopped (--redo reruns). The untrained base is evaluated
once (every method starts at ΔW = 0, PiSSA at W_res + s B0 A0 = W): the curves' step-0 point.

    python benchmarks/bench_lora_family.py            # SmolLM2-135M: 30 runs if every grid brackets, ~2.5-2.8 h
    python benchmarks/bench_lora_family.py --quick    # tiny random model, 2 steps: checks the script (~1 min)

Two 1-thread processes on the two cores ran the family in 110 min (RESULTS.md, 2-core Xeon); a last call reuses
every run and prints the whole table with the paired differences to LoRA:

    python benchmarks/bench_lora_family.py --threads 1 --methods lora mora_sharing mora_rope &
    python benchmarks/bench_lora_family.py --threads 1 --methods pissa dora rslora; wait
    python benchmarks/bench_lora_family.py

Budget (estimated, 2-core CPU alone): bench_memorization's runs of this setting took ~5.2 min each with five
evaluations; here four (the base is evaluated once) of one generation batch each, plus DoRA's row norms (~1.3-2x
a LoRA step) and PiSSA's SVD of every weight at the start. Each grid extension adds one run (~5 min): cap the
total with --max-extend 0 (30 runs) or resume later (finished runs are reused).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

from bench_memorization import best_of, run_one
from harness import REPO, compose, machine_line, save_record

FAMILY: dict[str, list[str]] = {
    "mora_rope": ["adapter=mora", "adapter.mora_type=rope"],
    "mora_sharing": ["adapter=mora_sharing"],
    "lora": ["adapter=lora"],
    "rslora": ["adapter=rslora"],
    "dora": ["adapter=dora"],
    "pissa": ["adapter=pissa"],
}
LABELS = {
    "mora_rope": "MoRA rope (type 6)",
    "mora_sharing": "MoRA sharing (type 1)",
    "lora": "LoRA",
    "rslora": "rsLoRA",
    "dora": "DoRA",
    "pissa": "PiSSA",
}
# Half-decade grids around each method's expected best rate: LoRA and MoRA from bench_memorization's grid
# (LoRA best 3e-3, sharing 3e-3, rope 1e-2); rsLoRA scales ΔW by alpha / sqrt(r) = 5.7 instead of 2 at r=8, and
# PiSSA (alpha = r) trains on W's principal directions: one half-decade lower.
DEFAULT_GRID = {
    "mora_rope": [3e-3, 1e-2, 3e-2],
    "mora_sharing": [1e-3, 3e-3, 1e-2],
    "lora": [1e-3, 3e-3, 1e-2],
    "rslora": [3e-4, 1e-3, 3e-3],
    "dora": [1e-3, 3e-3, 1e-2],
    "pissa": [3e-4, 1e-3, 3e-3],
}
QUICK_GRID = [1e-2, 3e-2]
REFERENCE = "lora"  # the paired differences are taken against it


def ladder(lr: float, up: bool) -> float:
    """The next rate of the 1-3-10 ladder above (or below) `lr`: 1e-3 -> 3e-3 -> 1e-2, and back."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if up:
        return float(f"{3 * 10**exponent if mantissa < 2 else 10 ** (exponent + 1):.1g}")
    return float(f"{10**exponent if mantissa > 2 else 3 * 10 ** (exponent - 1):.1g}")


def final(record: dict, key: str = "char_accuracy") -> float:
    return float(record["curve"][-1][key])


def base_point(opts: argparse.Namespace, out: Path) -> dict:
    """Char accuracy and exact match of the untrained base (cached in OUT/base_eval.json)."""
    import torch

    from mora_train.adapters import build_adapter
    from mora_train.models import load_model_and_tokenizer
    from mora_train.tasks import uuid as uuid_task

    overrides = [f"model={opts.model}", "task=uuid", f"task.num_pairs={opts.pairs}", *opts.extra_overrides]
    path = out / "base_eval.json"
    if path.exists() and not opts.redo and json.loads(path.read_text()).get("overrides") == overrides:
        return json.loads(path.read_text())["point"]
    cfg = compose([*overrides, "adapter=lora", f"rank={opts.rank}"])
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    adapter = build_adapter(model, cfg.adapter, cfg.rank)  # ΔW = 0: the base model's generations
    data = uuid_task.build(cfg.task, tokenizer, cfg.trainer.max_seq_len)
    (out / "base").mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        metrics = uuid_task.evaluate(cfg.task, adapter.model.eval(), tokenizer, data, out / "base")
    point = {"step": 0, "char_accuracy": metrics["char_accuracy"], "exact_match": metrics["exact_match"]}
    save_record(path, {"overrides": overrides, "point": point})
    return point


def train(method: str, lr: float, seed: int, opts: argparse.Namespace, out: Path, start: dict) -> dict:
    """One (method, lr, seed) run through bench_memorization's runner (reused when it finished before)."""
    run_opts = copy.copy(opts)
    run_opts.seed, run_opts.run_suffix = seed, f"_seed{seed}"
    print(f"[{datetime.now():%H:%M:%S}] {method} lr {lr:g} seed {seed}", flush=True)
    return run_one(method, lr, run_opts, out, adapter=[*FAMILY[method], f"rank={opts.rank}"], start_point=start)


def bracketed_grid(method: str, opts: argparse.Namespace, out: Path, start: dict) -> tuple[list[dict], bool]:
    """The method's seed-0 runs over its grid, widened while the best rate is at an edge; (runs, bracketed)."""
    runs = {lr: train(method, lr, 0, opts, out, start) for lr in sorted(opts.grid[method])}
    for added in range(opts.max_extend + 1):
        best = best_of(list(runs.values()))["lr"]
        low, high = min(runs), max(runs)
        if low < best < high or added == opts.max_extend:
            return [runs[lr] for lr in sorted(runs)], low < best < high
        beyond = ladder(low, up=False) if best == low else ladder(high, up=True)
        print(f"    best rate {best:g} is at the edge of the grid: adding {beyond:g}", flush=True)
        runs[beyond] = train(method, beyond, 0, opts, out, start)
    raise AssertionError("unreachable: the loop returns at its last pass")


def summaries(records: list[dict], steps: list[int]) -> dict:
    """Mean, sd, n and 95 % interval over the seeds: final metrics and the accuracy at every evaluated step."""
    from mora_train.analysis.stats import summarize

    def as_dict(values: list[float]) -> dict:
        s = summarize(values)
        assert s is not None
        return {"n": s.n, "mean": s.mean, "std": s.std, "ci_low": s.ci_low, "ci_high": s.ci_high}

    curve = {
        step: as_dict([p["char_accuracy"] for r in records for p in r["curve"] if p["step"] == step]) for step in steps
    }
    return {
        "char_accuracy": as_dict([final(r) for r in records]),
        "exact_match": as_dict([final(r, "exact_match") for r in records]),
        "final_loss": as_dict([r["final_loss"] for r in records if r["final_loss"] is not None]),
        "curve": {str(step): value for step, value in curve.items()},
    }


def paired_difference(records: list[dict], reference: list[dict]) -> dict | None:
    """Final char accuracy minus the reference's, seed by seed (same data order), summarized."""
    from mora_train.analysis.stats import summarize

    theirs = {r["seed"]: final(r) for r in reference}
    diffs = [final(r) - theirs[r["seed"]] for r in records if r["seed"] in theirs]
    s = summarize(diffs)
    return None if s is None else {"n": s.n, "mean": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high}


def _pm(stats: dict, digits: int = 3) -> str:
    if stats["ci_high"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['ci_high'] - stats['mean']:.{digits}f}"


def _ci(stats: dict, digits: int = 3) -> str:
    return "" if stats["ci_low"] is None else f"[{stats['ci_low']:.{digits}f}, {stats['ci_high']:.{digits}f}]"


def grid_table(grids: dict[str, tuple[list[dict], bool]]) -> list[str]:
    lines = [
        "| method | trainable params | lr | final char acc | final exact match | final loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, (records, bracketed) in grids.items():
        best = best_of(records)
        for r in records:
            mark = "**" if r is best else ""
            edge = " (edge)" if r is best and not bracketed else ""
            lines.append(
                f"| {LABELS[method]} | {r['trainable']:,} | {r['lr']:g}{edge} | {mark}{final(r):.3f}{mark} | "
                f"{final(r, 'exact_match'):.3f} | {r['final_loss']:.4f} | {r['train_runtime_s']:.0f} |"
            )
    return lines


def seed_table(seeded: dict[str, dict], mid: int) -> list[str]:
    lines = [
        (
            f"| method (best lr) | trainable | n | char acc at step {mid} | final char acc | 95 % CI | exact match | "
            f"final loss | − {LABELS[REFERENCE]} (paired) | 95 % CI of the difference |"
        ),
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for method, entry in seeded.items():
        s, diff = entry["summary"], entry["difference"]
        versus = ["", ""] if diff is None or method == REFERENCE else [f"{diff['mean']:+.3f}", _ci(diff)]
        cells = [
            f"{LABELS[method]} (lr {entry['lr']:g})",
            f"{entry['trainable']:,}",
            str(s["char_accuracy"]["n"]),
            _pm(s["curve"][str(mid)]),
            _pm(s["char_accuracy"]),
            _ci(s["char_accuracy"]),
            _pm(s["exact_match"]),
            _pm(s["final_loss"], 4),
            *versus,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables(grids: dict[str, tuple[list[dict], bool]], seeded: dict[str, dict], opts: argparse.Namespace) -> str:
    steps = [int(s) for s in next(iter(seeded.values()))["summary"]["curve"]]
    mid = steps[-2] if len(steps) > 1 else steps[-1]
    curve_lines = [f"| method | {' | '.join(f'step {s}' for s in steps)} |", "|---" * (len(steps) + 1) + "|"]
    for method, entry in seeded.items():
        curve = entry["summary"]["curve"]
        curve_lines.append(f"| {LABELS[method]} | " + " | ".join(_pm(curve[str(s)]) for s in steps) + " |")
    return (
        f"Learning-rate grid at seed 0 (bold: the best rate; '(edge)': the best rate was not bracketed within "
        f"--max-extend={opts.max_extend} extensions):\n\n"
        + "\n".join(grid_table(grids))
        + f"\n\n{opts.seeds} seeds at each method's best rate: mean ± half width of the 95 % Student-t interval "
        f"(t quantile at n - 1 degrees of freedom x sd / sqrt(n)); the difference to {LABELS[REFERENCE]} is taken "
        "seed by seed (same data order):\n\n"
        + "\n".join(seed_table(seeded, mid))
        + "\n\nCharacter accuracy during training (mean ± 95 % interval over the seeds):\n\n"
        + "\n".join(curve_lines)
    )


def plot(seeded: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, entry in seeded.items():
        curve = entry["summary"]["curve"]
        steps = [int(s) for s in curve]
        means = [curve[str(s)]["mean"] for s in steps]
        line = ax.plot(
            steps, means, marker="o", label=f"{LABELS[method]} (lr {entry['lr']:g}, n={curve[str(steps[-1])]['n']})"
        )
        if all(curve[str(s)]["ci_low"] is not None for s in steps):
            low = [max(0.0, curve[str(s)]["ci_low"]) for s in steps]
            high = [min(1.0, curve[str(s)]["ci_high"]) for s in steps]
            ax.fill_between(steps, low, high, color=line[0].get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("character accuracy (greedy, all keys)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def parse_grid(text: str | None, methods: list[str], quick: bool) -> dict[str, list[float]]:
    """`lora=1e-3,3e-3;dora=1e-3` -> per-method rates (methods not named keep their default grid)."""
    grid = {m: list(QUICK_GRID if quick else DEFAULT_GRID[m]) for m in methods}
    for part in filter(None, (text or "").split(";")):
        method, _, values = part.partition("=")
        if method.strip() not in FAMILY or not values:
            raise SystemExit(f"--grid part {part!r}: expected METHOD=LR[,LR...] with METHOD in {', '.join(FAMILY)}")
        grid[method.strip()] = [float(v) for v in values.split(",")]
    return grid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 pairs, 2 steps, grid 1e-2,3e-2")
    parser.add_argument("--model", default=None, help="model config (default smollm2-135m; quick: tiny-llama)")
    parser.add_argument("--methods", nargs="*", default=list(FAMILY), choices=list(FAMILY))
    parser.add_argument("--pairs", type=int, default=None, help="UUID pairs to memorize (default 32; quick 4)")
    parser.add_argument("--rank", type=int, default=8, help="the rank of every method (MoRA: the same budget)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; quick 2)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default 15; quick 1)")
    parser.add_argument(
        "--eval-batch", type=int, default=32, help="keys per generation batch (32: all keys in one batch)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds at each method's best rate (seed 0 included)")
    parser.add_argument("--max-extend", type=int, default=1, help="rates added per method to bracket its best")
    parser.add_argument(
        "--grid", dest="grid_text", default=None, help="per-method rates, e.g. 'lora=1e-3,3e-3;dora=1e-3'"
    )
    parser.add_argument("--redo", action="store_true", help="rerun finished runs instead of reusing their records")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "lora_family")
    opts = parser.parse_args()
    opts.model = opts.model or ("tiny-llama" if opts.quick else "smollm2-135m")
    opts.pairs = opts.pairs or (4 if opts.quick else 32)
    opts.steps = opts.steps or (2 if opts.quick else 60)
    opts.eval_every = opts.eval_every or (1 if opts.quick else 15)
    opts.grid = parse_grid(opts.grid_text, opts.methods, opts.quick)
    # bench_memorization's runner adds these to every run's overrides (and the base evaluation uses them too).
    opts.extra_overrides = [f"task.eval.batch_size={opts.eval_batch}"]
    return opts


def main() -> None:
    opts = parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    out = opts.out / ("quick" if opts.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_lora_family.py " + " ".join(sys.argv[1:])
    header = (
        f"# {machine_line(opts.threads)}\n# command: {command}\n# model {opts.model}, {opts.pairs} pairs, rank "
        f"{opts.rank}, {opts.steps} steps of batch {opts.batch}, {opts.seeds} seeds, grid {json.dumps(opts.grid)}"
    )
    print(header, flush=True)
    started = time.time()
    start = base_point(opts, out)
    grids = {method: bracketed_grid(method, opts, out, start) for method in opts.methods}
    seeded: dict[str, dict] = {}
    runs_by_method: dict[str, list[dict]] = {}
    for method, (records, _bracketed) in grids.items():
        best = best_of(records)
        runs = [best] + [train(method, best["lr"], seed, opts, out, start) for seed in range(1, opts.seeds)]
        for seed, record in enumerate(runs):
            record["seed"] = seed
        runs_by_method[method] = runs
    # Without the reference (a process given part of the methods) there is no paired difference; a later call with
    # every method reuses all finished runs and prints the whole table.
    reference = runs_by_method.get(REFERENCE)
    steps = [p["step"] for p in next(iter(runs_by_method.values()))[0]["curve"]]
    for method, runs in runs_by_method.items():
        seeded[method] = {
            "lr": runs[0]["lr"],
            "trainable": runs[0]["trainable"],
            "bracketed": grids[method][1],
            "summary": summaries(runs, steps),
            "difference": None if reference is None else paired_difference(runs, reference),
        }
    text = tables(grids, seeded, opts)
    wall = time.time() - started
    print(f"\n{text}\n\nwall time {wall:.0f} s ({wall / 60:.1f} min)")
    (out / "results.md").write_text(f"{header}\n\n{text}\n\nwall time {wall:.0f} s\n")
    results = {"command": command, "grids": {m: g[0] for m, g in grids.items()}, "seeded": seeded, "wall_s": wall}
    save_record(out / "results.json", results)
    plot(
        seeded,
        out / "accuracy_vs_step.png",
        f"UUID memorization, {opts.model}, {opts.pairs} pairs, r={opts.rank}: mean, 95 % band, {opts.seeds} seeds",
    )
    print(f"plot: {out / 'accuracy_vs_step.png'}")


if __name__ == "__main__":
    main()

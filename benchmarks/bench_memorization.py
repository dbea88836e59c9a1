#!/usr/bin/env python
"""The paper's UUID memorization (Fig. 3) at CPU scale: LoRA vs MoRA (types 1 and 6) vs full FT.

SmolLM2-135M learns N random key -> value UUID pairs (task=uuid: loss on the value only). Every method
trains the same number of steps on the same batches through mora-train's own trainer (the composed
config a user gets from `mora-train task=uuid adapter=... rank=...`); LoRA and MoRA use the same rank,
so the same number of trainable parameters. The learning rate is tuned per method on a small grid; each
(method, lr) run is evaluated by greedy generation (character accuracy and exact match over all keys)
before training and every --eval-every steps. The table reports, per method, the grid and the curve at the
best learning rate (highest final character accuracy, then lowest final loss); the PNG plots accuracy
against step for every run. Finished (method, lr) runs are kept in OUT/full/METHOD_lrLR/record.json and
reused by a later call with the same settings, so widening the grid (e.g. when a method's best rate is at
the edge of its grid) only runs the new points.

    python benchmarks/bench_memorization.py           # SmolLM2-135M, 32 pairs, r=8, 60 steps of 8: 10 runs, ~52 min
    python benchmarks/bench_memorization.py --quick   # tiny random model: checks the script (~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from harness import (
    METHOD_LABELS,
    METHODS,
    REPO,
    build_adapter_from_config,
    compose,
    finished_record,
    machine_line,
    method_overrides,
    save_record,
)

# Learning-rate grids per method: adapters take a higher rate than full fine-tuning of all weights.
DEFAULT_GRID = {
    "full": [5e-5, 2e-4],
    "lora": [1e-3, 3e-3, 1e-2],
    "mora_sharing": [1e-3, 3e-3],
    "mora_rope": [1e-3, 3e-3, 1e-2],
}


def parse_grid(text: str | None, methods: list[str]) -> dict[str, list[float]]:
    """`lora=1e-3,3e-3;full=1e-4` -> per-method lists (methods not named keep the default grid)."""
    grid = {m: list(DEFAULT_GRID[m]) for m in methods}
    for part in filter(None, (text or "").split(";")):
        method, _, values = part.partition("=")
        if method.strip() not in METHODS or not values:
            raise SystemExit(f"--grid part {part!r}: expected METHOD=LR[,LR...] with METHOD in {', '.join(METHODS)}")
        grid[method.strip()] = [float(v) for v in values.split(",")]
    return grid


def run_one(
    method: str,
    lr: float,
    opts: argparse.Namespace,
    out: Path,
    adapter: list[str] | None = None,
    start_point: dict | None = None,
) -> dict:
    """Train one (method, lr) with the mora-train trainer, evaluating along the way; return its record.

    `adapter`: the adapter overrides (default: harness.method_overrides(method)); `start_point`: the curve's
    step-0 point when it is known already (the untrained base, evaluated once by the caller)."""
    import torch
    from transformers import TrainerCallback, set_seed

    from mora_train.adapters.base import count_parameters
    from mora_train.tasks import uuid as uuid_task
    from mora_train.training.restarts import TrainingExtras
    from mora_train.training.trainer import train

    overrides = [
        f"model={opts.model}",
        "task=uuid",
        f"task.num_pairs={opts.pairs}",
        *(adapter if adapter is not None else method_overrides(method, opts.rank)),
        f"trainer.max_steps={opts.steps}",
        f"trainer.batch_size={opts.batch}",
        f"trainer.micro_batch_size={opts.batch}",
        f"trainer.learning_rate={lr}",
        "trainer.save_steps=0",
        f"trainer.logging_steps={opts.eval_every}",
        f"seed={opts.seed}",
        *getattr(opts, "extra_overrides", []),
    ]
    run_dir = out / (f"{method}_lr{lr:g}" + getattr(opts, "run_suffix", ""))
    done = run_dir / "record.json"
    record = None if opts.redo else finished_record(done, overrides)
    if record is not None:  # the same run finished before: reuse it (--redo to rerun)
        print(f"    reusing {done}", flush=True)
        return record
    cfg = compose(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    adapter, tokenizer = build_adapter_from_config(cfg)
    data = uuid_task.build(cfg.task, tokenizer, cfg.trainer.max_seq_len)
    trainable, _ = count_parameters(adapter.model)

    curve: list[dict] = []

    def evaluate(step: int) -> None:
        model = adapter.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = uuid_task.evaluate(cfg.task, model, tokenizer, data, run_dir)
        model.train(was_training)
        curve.append({"step": step, "char_accuracy": metrics["char_accuracy"], "exact_match": metrics["exact_match"]})
        print(
            f"    step {step:4d}: char acc {metrics['char_accuracy']:.3f}, exact {metrics['exact_match']:.3f}",
            flush=True,
        )

    class EvalEvery(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            if state.global_step % opts.eval_every == 0 or state.global_step == opts.steps:
                evaluate(state.global_step)

    started = time.time()
    if start_point is None:
        evaluate(0)
    else:
        curve.append(dict(start_point))
    result = train(
        adapter, tokenizer, data.train, cfg.trainer, cfg.seed, run_dir, None, TrainingExtras(callbacks=[EvalEvery()])
    )
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    record = {
        "method": method,
        "lr": lr,
        "rank": opts.rank,
        "trainable": trainable,
        "curve": curve,
        "final_loss": losses[-1] if losses else None,
        "train_runtime_s": result.runtime_s,
        "tokens_per_s": result.tokens_per_s,
        "wall_s": time.time() - started,
        "overrides": overrides,
    }
    save_record(done, record)
    return record


def best_of(records: list[dict]) -> dict:
    return max(records, key=lambda r: (r["curve"][-1]["char_accuracy"], -(r["final_loss"] or 0.0)))


def tables(by_method: dict[str, list[dict]], opts: argparse.Namespace) -> str:
    steps = [p["step"] for p in next(iter(by_method.values()))[0]["curve"]]
    grid_lines = [
        "| method | trainable params | lr | final char acc | final exact match | final loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    curve_lines = [
        f"| method (best lr) | {' | '.join(f'step {s}' for s in steps)} | exact match |",
        "|---" * (len(steps) + 2) + "|",
    ]
    for method, records in by_method.items():
        label = METHOD_LABELS[method] + ("" if method == "full" else f" r={opts.rank}")
        for r in records:
            last = r["curve"][-1]
            grid_lines.append(
                f"| {label} | {r['trainable']:,} | {r['lr']:g} | {last['char_accuracy']:.3f} | "
                f"{last['exact_match']:.3f} | {r['final_loss']:.4f} | {r['train_runtime_s']:.0f} |"
            )
        best = best_of(records)
        curve_lines.append(
            f"| {label} (lr {best['lr']:g}) | "
            + " | ".join(f"{p['char_accuracy']:.3f}" for p in best["curve"])
            + f" | {best['curve'][-1]['exact_match']:.3f} |"
        )
    return (
        "Learning-rate grid (char accuracy / exact match after the last step):\n\n"
        + "\n".join(grid_lines)
        + "\n\nCharacter accuracy during training at each method's best learning rate:\n\n"
        + "\n".join(curve_lines)
    )


def plot(by_method: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(METHODS, ["tab:gray", "tab:blue", "tab:orange", "tab:red"], strict=True))
    for method, records in by_method.items():
        best = best_of(records)
        for r in records:
            xs = [p["step"] for p in r["curve"]]
            ys = [p["char_accuracy"] for p in r["curve"]]
            is_best = r is best
            ax.plot(
                xs,
                ys,
                marker="o" if is_best else None,
                linestyle="-" if is_best else ":",
                color=colors[method],
                alpha=1.0 if is_best else 0.6,
                label=f"{METHOD_LABELS[method]} lr {r['lr']:g}" + (" (best)" if is_best else ""),
            )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 pairs, a few steps")
    parser.add_argument("--model", default=None, help="model config (default smollm2-135m; quick: tiny-llama)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pairs", type=int, default=None, help="UUID pairs to memorize (default 32; quick 4)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; MoRA gets the same parameter budget")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; quick 4)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default 15; quick 2)")
    parser.add_argument(
        "--grid",
        default=None,
        help=f"per-method learning rates, e.g. 'lora=1e-3,3e-3;full=1e-4' (default {json.dumps(DEFAULT_GRID)})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redo",
        action="store_true",
        help="rerun (method, lr) pairs already finished under --out "
        "(by default their record.json is reused, so widening --grid only runs the new points)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "memorization")
    opts = parser.parse_args()
    opts.model = opts.model or ("tiny-llama" if opts.quick else "smollm2-135m")
    opts.pairs = opts.pairs or (4 if opts.quick else 32)
    opts.steps = opts.steps or (4 if opts.quick else 60)
    opts.eval_every = opts.eval_every or (2 if opts.quick else 15)
    grid = parse_grid(opts.grid, opts.methods)

    import torch

    torch.set_num_threads(opts.threads)
    out = opts.out / ("quick" if opts.quick else "full")
    command = "python benchmarks/bench_memorization.py " + " ".join(sys.argv[1:])
    header = (
        f"# {machine_line(opts.threads)}\n# command: {command}\n# model {opts.model}, {opts.pairs} pairs, rank "
        f"{opts.rank}, {opts.steps} steps of batch {opts.batch}, grid {json.dumps(grid)}"
    )
    print(header, flush=True)
    started = time.time()
    by_method: dict[str, list[dict]] = {}
    for method in opts.methods:
        for lr in grid[method]:
            print(f"[{datetime.now():%H:%M:%S}] {method} lr {lr:g}", flush=True)
            by_method.setdefault(method, []).append(run_one(method, lr, opts, out))
    text = tables(by_method, opts)
    wall = time.time() - started
    print(f"\n{text}\n\nwall time {wall:.0f} s ({wall / 60:.1f} min)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"{header}\n\n{text}\n\nwall time {wall:.0f} s\n")
    (out / "results.json").write_text(
        json.dumps({"command": command, "by_method": by_method, "wall_s": wall}, indent=1)
    )
    plot(
        by_method,
        out / "accuracy_vs_step.png",
        f"UUID memorization, {opts.model}, {opts.pairs} pairs, r={opts.rank}, batch {opts.batch}",
    )
    print(f"plot: {out / 'accuracy_vs_step.png'}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Evaluation while training on a run built to overfit: the validation-loss curve, the early stop, the best step.

SmolLM2-135M is instruction-tuned on few conversations (the first --train-limit Self-Instruct seed tasks of the
shared data, --val-size of them carved out as the validation set with task.val_size) for many epochs, and
evaluated every --eval-steps steps. The validation loss falls while the model adapts to the data and turns up
once it learns the few training conversations by heart (the training loss keeps falling);
trainer.early_stopping_patience ends the run and trainer.load_best makes merged/ the best step's model.
(--heldout validates on the held-out user-oriented tasks, task.data.eval, instead: another distribution, which
SmolLM2-135M-Instruct already fits; in a 3-step check at lr 1e-3 its loss rose from the first evaluation.)
Each adapter given is one `mora-train` run (the CLI, as a user runs it); the script reads their
log_history.json and metrics.json and writes into --out:

    early_stop.png    training and validation loss against step per run, the best step and the early stop marked
    results.json      per run: the curves, best step and loss, the step it stopped at, what merged/ holds
    results.md        the table (and the command lines that produced it)
    runs/ADAPTER/     each run's own run dir (metrics.json, log_history.json, tensorboard/ with the samples, ...)

    python benchmarks/bench_early_stop.py --out benchmarks/results/early_stop                  # SmolLM2-135M
    python benchmarks/bench_early_stop.py --quick --out /tmp/early_stop   # tiny random model, UUIDs (~30 s)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import METHOD_LABELS, machine_line, method_overrides, run_mora_train


def overrides_for(adapter: str, opts: argparse.Namespace) -> list[str]:
    """The mora-train command line of one run."""
    evaluation = [
        f"trainer.max_steps={opts.max_steps}",
        f"trainer.learning_rate={opts.lr}",
        "trainer.lr_scheduler=constant",
        "trainer.warmup_steps=0",
        f"trainer.logging_steps={opts.eval_steps}",
        f"trainer.eval_steps={opts.eval_steps}",
        f"trainer.save_steps={opts.eval_steps}",
        f"trainer.early_stopping_patience={opts.patience}",
        "trainer.load_best=true",
        f"trainer.sample_every={opts.eval_steps * 2}",
        "trainer.num_samples=2",
    ]
    if opts.quick:  # 8 random UUID pairs learned, 4 others held out (nothing of them can be learned)
        task = ["model=tiny-llama", "task=uuid", "task.num_pairs=12", "task.val_size=4", "task.eval.max_samples=4"]
        return [*task, *method_overrides(adapter, 4), "trainer.batch_size=8", "trainer.micro_batch_size=4", *evaluation]
    task = [
        f"model={opts.model}",
        "task=instruction",
        f"task.data.train.limit={opts.train_limit}",
        f"task.eval.max_samples={opts.eval_samples}",
        "task.eval.num_generations=2",
        f"trainer.max_seq_len={opts.max_seq_len}",
    ]
    if not opts.heldout:  # validation conversations of the training distribution, carved out of the first ones
        task.append(f"task.val_size={opts.val_size}")
    batch = [f"trainer.batch_size={opts.batch}", f"trainer.micro_batch_size={min(opts.batch, 4)}"]
    return [*task, *method_overrides(adapter, opts.rank), *batch, *evaluation]


def curve(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h and "step" in h]


def run_one(adapter: str, opts: argparse.Namespace, out: Path) -> dict:
    overrides = overrides_for(adapter, opts)
    started = time.time()
    metrics = run_mora_train(overrides, out / "runs" / adapter, threads=opts.threads)
    history = json.loads((out / "runs" / adapter / "log_history.json").read_text())
    record = {
        "adapter": adapter,
        "command": "mora-train " + " ".join(overrides),
        "train_curve": curve(history, "loss"),
        "eval_curve": curve(history, "eval_loss"),
        "max_steps": opts.max_steps,
        "steps_run": metrics["train_steps"],
        "best_step": metrics["best_step"],
        "best_eval_loss": metrics["best_eval_loss"],
        "early_stopped_at_step": metrics["run"]["early_stopped_at_step"],
        "weights_step": metrics["run"]["weights_step"],
        "validation": metrics["run"]["validation"],
        "primary_metric": metrics["primary_metric"],
        "primary_value": metrics.get(metrics["primary_metric"]),
        "wall_time_s": time.time() - started,
    }
    print(
        f"{adapter}: {record['steps_run']} of {opts.max_steps} steps, lowest eval_loss {record['best_eval_loss']:.4f} "
        f"at step {record['best_step']}, stopped early at {record['early_stopped_at_step']}, merged/ holds step "
        f"{record['weights_step']} ({record['wall_time_s']:.0f} s)",
        flush=True,
    )
    return record


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, record in enumerate(records):
        color = f"C{i}"
        label = METHOD_LABELS.get(record["adapter"], record["adapter"])
        for key, style, what in (("train_curve", "--", "training"), ("eval_curve", "-", "validation")):
            if record[key]:
                steps, losses = zip(*record[key], strict=True)
                ax.plot(steps, losses, style, color=color, marker="o", markersize=3, label=f"{label}: {what} loss")
        ax.axvline(record["best_step"], color=color, linestyle=":", label=f"{label}: best step {record['best_step']}")
        if record["early_stopped_at_step"] is not None:
            ax.axvline(record["early_stopped_at_step"], color=color, linestyle="-.", alpha=0.6)
            ax.annotate(
                "early stop",
                (record["early_stopped_at_step"], ax.get_ylim()[1]),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(records: list[dict], opts: argparse.Namespace) -> str:
    header = (
        "| adapter | steps run / max | lowest eval_loss | at step | stopped early at | merged/ holds step | "
        "primary metric of merged/ | wall time |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in records:
        value = r["primary_value"]
        lines.append(
            f"| {METHOD_LABELS.get(r['adapter'], r['adapter'])} | {r['steps_run']} / {r['max_steps']} | "
            f"{r['best_eval_loss']:.4f} | {r['best_step']} | {r['early_stopped_at_step']} | {r['weights_step']} | "
            f"{r['primary_metric']} {value if value is None else f'{value:.4f}'} | {r['wall_time_s']:.0f} s |"
        )
    commands = "\n".join(f"    {r['command']}" for r in records)
    return "\n".join(
        [
            f"Validation set: {records[0]['validation']}. Machine: {machine_line(opts.threads)}.",
            "",
            *lines,
            "",
            "Runs (each `mora-train` command line):",
            "",
            commands,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the plot, the tables and the run dirs")
    parser.add_argument("--quick", action="store_true", help="tiny random model on UUID pairs: checks the script")
    parser.add_argument("--adapters", nargs="+", default=["mora_sharing"], help="lora, mora_sharing, mora_rope, full")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (quick: 3e-2)")
    parser.add_argument("--max-steps", type=int, default=None, help="default: 300 (quick: 40)")
    parser.add_argument("--eval-steps", type=int, default=None, help="default: 5 (quick: 2)")
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument(
        "--train-limit", type=int, default=64, help="conversations read for training (few: it overfits)"
    )
    parser.add_argument("--val-size", type=int, default=16, help="of those, carved out as the validation set")
    parser.add_argument(
        "--heldout", action="store_true", help="validate on the held-out user-oriented tasks (task.data.eval) instead"
    )
    parser.add_argument("--eval-samples", type=int, default=48, help="held-out conversations of the final evaluation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    opts = parser.parse_args()
    opts.lr = opts.lr or (3e-2 if opts.quick else 1e-3)
    opts.max_steps = opts.max_steps or (40 if opts.quick else 300)
    opts.eval_steps = opts.eval_steps or (2 if opts.quick else 5)
    if opts.quick:
        opts.patience = min(opts.patience, 2)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    records = [run_one(adapter, opts, out) for adapter in opts.adapters]
    (out / "results.json").write_text(
        json.dumps({"settings": vars(opts) | {"out": str(out)}, "runs": records}, indent=1)
    )
    what = "tiny random model, UUID pairs" if opts.quick else f"{opts.model}, {opts.train_limit} Self-Instruct tasks"
    plot(records, out / "early_stop.png", f"Early stopping on a run that overfits ({what})")
    (out / "results.md").write_text(table(records, opts))
    print(f"wrote {out / 'early_stop.png'}, {out / 'results.md'}, {out / 'results.json'}")


if __name__ == "__main__":
    main()

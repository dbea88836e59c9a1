#!/usr/bin/env python
"""QMoRA vs QLoRA: does MoRA keep its memorization advantage over LoRA on a 4-bit (nf4) base?

The memorization setting of benchmarks/bench_memorization.py (SmolLM2-135M, 32 UUID pairs, r=8, 60 steps of
8, greedy evaluation over all keys), each method at its best learning rate from that benchmark (RESULTS.md:
LoRA 3e-3, MoRA rope 1e-2), once on the float32 base and once with model.quantization=nf4 (double
quantization, float32 compute). Every run is its own process, so its peak RSS (ru_maxrss) is its own;
tokens/s is the trainer's (non-padding tokens / train runtime, evaluation excluded). The four runs go one
after another in one invocation, so their ratios are side by side on the same machine.

    python benchmarks/bench_qmora.py            # SmolLM2-135M: 4 runs, ~25 min on 2 CPU cores
    python benchmarks/bench_qmora.py --quick    # tiny random model, 4 steps: checks the script (~1 min)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, machine_line, save_record

# (method of bench_memorization, learning rate): each method's best rate in RESULTS.md's memorization table.
METHODS = {"lora": 3e-3, "mora_rope": 1e-2}
LABELS = {"lora": "LoRA r=8", "mora_rope": "MoRA rope r=8"}
QUANTIZATIONS = ("none", "nf4")


def run_child(opts: argparse.Namespace) -> None:
    """One (method, quantization) run in this process; its record (with peak RSS) goes to --record."""
    import bench_memorization
    import torch

    torch.set_num_threads(opts.threads)
    opts.extra_overrides = [f"model.quantization={opts.quantization}"]
    opts.run_suffix = f"_{opts.quantization}"
    opts.redo = True
    record = bench_memorization.run_one(opts.method, opts.lr, opts, opts.out)
    record.update(
        quantization=opts.quantization, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    save_record(opts.record, record)


def table(records: list[dict]) -> str:
    steps = " → ".join(str(p["step"]) for p in records[0]["curve"])
    lines = [
        f"| method | base | lr | peak RSS | tokens/s | char acc at step {steps} | exact match | final loss |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in records:
        curve = " → ".join(f"{p['char_accuracy']:.3f}" for p in r["curve"])
        lines.append(
            f"| {LABELS[r['method']]} | {'fp32' if r['quantization'] == 'none' else r['quantization']} | "
            f"{r['lr']:g} | {r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['tokens_per_s']:,.0f} | {curve} | "
            f"{r['curve'][-1]['exact_match']:.3f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 pairs, 4 steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "qmora")
    # one run (the parent starts these in child processes)
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.model = "tiny-llama" if opts.quick else "smollm2-135m"
    opts.pairs, opts.steps, opts.eval_every = (4, 4, 2) if opts.quick else (32, 60, 30)
    opts.rank, opts.batch, opts.seed = 8, 8, 0
    out = opts.out / ("quick" if opts.quick else "full")
    if opts.method:
        opts.lr, opts.out = METHODS[opts.method], out
        run_child(opts)
        return

    command = "python benchmarks/bench_qmora.py " + " ".join(sys.argv[1:])
    header = (
        f"# {machine_line(opts.threads)}\n# command: {command}\n# model {opts.model}, {opts.pairs} pairs, rank "
        f"{opts.rank}, {opts.steps} steps of batch {opts.batch}, each run in its own process"
    )
    print(header, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = []
    for method in METHODS:
        for quantization in QUANTIZATIONS:
            record_path = out / f"{method}_{quantization}.json"
            print(f"{method}, base {quantization}", flush=True)
            args = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--method",
                method,
                "--quantization",
                quantization,
                "--record",
                str(record_path),
                "--threads",
                str(opts.threads),
                "--out",
                str(opts.out),
            ]
            # check=False: a failure is reported below with the method and base it ran.
            done = subprocess.run(args + (["--quick"] if opts.quick else []), cwd=REPO, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the {method} run on the {quantization} base failed (exit {done.returncode})")
            records.append(json.loads(record_path.read_text()))
    text = table(records)
    wall = time.time() - started
    print(f"\n{text}\n\nwall time {wall:.0f} s ({wall / 60:.1f} min)")
    (out / "results.md").write_text(f"{header}\n\n{text}\n\nwall time {wall:.0f} s\n")
    (out / "results.json").write_text(json.dumps({"command": command, "records": records, "wall_s": wall}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""MoRA exported as plain LoRA (mora-train-export): does the served adapter keep what MoRA memorized?

SmolLM2-135M learns the default job's UUID pairs (task=uuid, 60 steps, lr 2e-3) with MoRA r=8 of two
types — rope (chunked: its ΔW has rank up to min(d_in, d_out), so a LoRA export is exact only at that
rank) and sharing (summing: an exact LoRA of rank r̂). Each run is exported exactly and truncated to
ranks 8, 32 and 128; every export is checked with plain peft in a separate process and evaluated by the
task's own greedy-generation evaluation. The table gives UUID character accuracy of the MoRA model
(the run's evaluation of its merged model), of each export, the export's relative ΔW error, rank,
file size and export time. Finished training runs are reused (OUT/run-TYPE/metrics.json).

    python benchmarks/bench_lora_export.py             # SmolLM2-135M: 2 training runs + 8 exports, ~25 min
    python benchmarks/bench_lora_export.py --quick     # tiny random model: checks the script (~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness import REPO, machine_line, run_mora_train

sys.path.insert(0, str(REPO))

RANKS = (8, 32, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "lora-export")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few steps: checks the script")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    from mora_train.pipeline.lora_export import export_run

    base = ["task=uuid", "rank=8"]
    if opts.quick:
        base += [
            "model=tiny-llama",
            "task.num_pairs=4",
            "trainer.max_steps=6",
            "trainer.batch_size=4",
            "trainer.micro_batch_size=4",
            "trainer.learning_rate=1e-2",
            "trainer.save_steps=0",
        ]
    rows = []
    for kind in ("rope", "sharing"):
        run_dir = opts.out / f"run-{kind}"
        overrides = [*base, "adapter=mora", f"adapter.mora_type={kind}"]
        if (run_dir / "metrics.json").is_file() and json.loads((run_dir / "overrides.json").read_text()) == overrides:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        else:
            print(f"training MoRA {kind} ...", flush=True)
            metrics = run_mora_train(overrides, run_dir, threads=opts.threads)
            (run_dir / "overrides.json").write_text(json.dumps(overrides))
        adapter_bytes = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
        rows.append(
            {
                "type": kind,
                "what": "MoRA model (merged/)",
                "rank": "-",
                "char_accuracy": metrics["char_accuracy"],
                "error": 0.0,
                "mb": adapter_bytes / 2**20,
                "time_s": None,
            }
        )
        for rank in (None, *RANKS):
            label = "exact" if rank is None else f"r{rank}"
            started = time.time()
            report = export_run(run_dir, opts.out / f"export-{kind}-{label}", rank=rank, evaluate=False)
            elapsed = time.time() - started  # export + the plain-peft check, no evaluation
            evaluated = export_run(run_dir, opts.out / f"export-{kind}-{label}", rank=rank, check=False, evaluate=True)
            size = (opts.out / f"export-{kind}-{label}" / "adapter_model.safetensors").stat().st_size
            rows.append(
                {
                    "type": kind,
                    "what": f"LoRA export {label}",
                    "rank": report["rank"],
                    "char_accuracy": evaluated["evaluation"]["exported_lora"],
                    "error": report["max_relative_error"],
                    "mean_error": report["mean_relative_error"],
                    "peft_diff": report["peft_max_abs_logit_diff"],
                    "mb": size / 2**20,
                    "time_s": elapsed,
                    "adapter_accuracy": evaluated["evaluation"]["adapter"],
                }
            )
            print(
                f"  {kind} {label}: rank {report['rank']}, char acc {rows[-1]['char_accuracy']:.4f} "
                f"(adapter {rows[-1]['adapter_accuracy']:.4f}), max rel err {report['max_relative_error']:.2e}, "
                f"{size / 2**20:.1f} MB, {elapsed:.1f} s",
                flush=True,
            )
    lines = [
        (
            f"Machine: {machine_line(opts.threads)}. "
            f"Command: `python benchmarks/bench_lora_export.py{' --quick' if opts.quick else ''}`."
        ),
        "",
        (
            "| MoRA type | model | LoRA rank | UUID char accuracy | max / mean relative ΔW error | "
            "peft check max abs logit diff | file MB | export + check s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "-" if r["what"].startswith("MoRA") else f"{r['error']:.2e} / {r['mean_error']:.2e}"
        diff = f"{r['peft_diff']:.1e}" if "peft_diff" in r else "-"
        secs = "-" if r["time_s"] is None else f"{r['time_s']:.1f}"
        lines.append(
            f"| {r['type']} | {r['what']} | {r['rank']} | {r['char_accuracy']:.4f} | "
            f"{err} | {diff} | {r['mb']:.2f} | {secs} |"
        )
    table = "\n".join(lines)
    (opts.out / "results.md").write_text(table + "\n")
    (opts.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()

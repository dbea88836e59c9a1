#!/usr/bin/env python
"""End-to-end training cost: tokens/s and peak RSS of full FT, LoRA and MoRA (types 1 and 6) side by side.

Every method trains the same model on the same batch (random token ids: content does not change the
cost) with AdamW, forward + backward + optimizer step, no gradient checkpointing, fp32. LoRA and MoRA
use the same `rank`, so they train the same number of parameters (MoRA's r̂ is sized from it).

Method
* Each (method, round) is a fresh subprocess: the model is loaded and wrapped exactly as `mora-train`
  does (composed Hydra config), `--warmup` steps run untimed, then `--steps` steps are timed; the
  round's figure is tokens per step / median step time.
* Peak RSS: the kernel's peak counter is reset after the model, adapter and batch are built (so the
  load's transient copies do not count) and read after the last step: weights + gradients +
  optimizer state + activations at their peak. The RSS after loading is reported beside it.
* Rounds interleave the methods in a shuffled order, so drift of the machine hits all of them; each
  ratio to LoRA is taken within a round and the table shows the median over rounds.

    python benchmarks/bench_train.py             # SmolLM2-135M, r=8, 3 rounds (~10 min on 2 CPU cores)
    python benchmarks/bench_train.py --quick     # tiny random model: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
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
    machine_line,
    method_overrides,
    reset_peak_rss,
    status_kb,
)


def child(method: str, opts: argparse.Namespace) -> dict:
    """In a fresh process: build, train a few steps, return timings and memory."""
    import torch

    from mora_train.adapters.base import count_parameters

    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    adapter, _ = build_adapter_from_config(compose([f"model={opts.model}", *method_overrides(method, opts.rank)]))
    model = adapter.model
    model.train()
    trainable, total = count_parameters(model)
    # A small learning rate: the benchmark measures cost, and must not diverge over a few steps.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (opts.batch, opts.seq), generator=torch.Generator().manual_seed(0))
    rss_loaded_kb = status_kb("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(opts.warmup + opts.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[opts.warmup :]
    return {
        "method": method,
        "tokens_per_s": opts.batch * opts.seq / statistics.median(timed),
        "step_s": timed,
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "rss_loaded_mb": rss_loaded_kb / 1024,
        "trainable": trainable,
        "total": total,
        "final_loss": float(loss),
    }


def run_child(method: str, opts: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--model",
        opts.model,
        "--rank",
        str(opts.rank),
        "--batch",
        str(opts.batch),
        "--seq",
        str(opts.seq),
        "--steps",
        str(opts.steps),
        "--warmup",
        str(opts.warmup),
        "--threads",
        str(opts.threads),
    ]
    # check=False: a failure is reported below with the child's stderr.
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]], opts: argparse.Namespace) -> str:
    lora = results.get("lora")
    lines = [
        (
            f"| method (r={opts.rank}) | trainable params | tokens/s (median of rounds) | ratio to LoRA "
            "(median of per-round ratios) | peak RSS MB | ratio to LoRA | RSS after load MB |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, rounds in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rounds)
        peak = statistics.median(r["peak_rss_mb"] for r in rounds)
        if lora:
            speed_ratio = statistics.median(
                r["tokens_per_s"] / lo["tokens_per_s"] for r, lo in zip(rounds, lora, strict=True)
            )
            mem_ratio = statistics.median(
                r["peak_rss_mb"] / lo["peak_rss_mb"] for r, lo in zip(rounds, lora, strict=True)
            )
            ratios = f"{speed_ratio:.3f} | {peak:.0f} | {mem_ratio:.3f}"
        else:
            ratios = f"n/a | {peak:.0f} | n/a"
        lines.append(
            f"| {METHOD_LABELS[method]} | {rounds[0]['trainable']:,} | {tps:.1f} | {ratios} | "
            f"{statistics.median(r['rss_loaded_mb'] for r in rounds):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 round (smoke test)")
    parser.add_argument("--model", default=None, help="model config (default smollm2-135m; quick: tiny-llama)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "train")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.model = opts.model or ("tiny-llama" if opts.quick else "smollm2-135m")
    if opts.child:
        print(json.dumps(child(opts.child, opts)))
        return
    rounds = opts.rounds or (1 if opts.quick else 3)
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    print(
        f"# {machine_line(opts.threads)}\n# command: {command}\n# model {opts.model}, batch {opts.batch} x "
        f"{opts.seq} tokens, {opts.warmup} warm-up + {opts.steps} timed steps, {rounds} rounds",
        flush=True,
    )
    # LoRA first in the dict so the table lists it first; the run order is shuffled per round below.
    methods = sorted(opts.methods, key=lambda m: m != "lora")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    shuffler = random.Random(0)
    started = time.time()
    for round_index in range(rounds):
        order = list(methods)
        shuffler.shuffle(order)
        for method in order:
            r = run_child(method, opts)
            results[method].append(r)
            print(
                f"[{datetime.now():%H:%M:%S}] round {round_index + 1}: {method:13s} {r['tokens_per_s']:7.1f} tokens/s, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    text = table(results, opts)
    print(f"\n{text}\n\nwall time {time.time() - started:.0f} s")
    out = opts.out / ("quick" if opts.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps({"command": command, "machine": machine_line(opts.threads), "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training throughput on one GPU: full FT, LoRA r=8, MoRA sharing / rope at r=8 and r=256, side by side.

The `llama-1b` config (1.3 B parameters, random init, byte tokenizer), bf16 autocast over fp32 weights
(what trainer.precision=bf16 does), sequence length 2048, AdamW (fused on CUDA), no gradient checkpointing.
For each method: build the model and adapter exactly as `mora-train` does (composed Hydra config) directly
on the device, `--warmup` untimed steps, then `--steps` timed optimizer steps (forward + backward + step,
synchronised); tokens/s = batch x seq / median step time. Rounds repeat the methods in a shuffled order, so
drift hits all of them; each ratio to LoRA is taken within a round, the median over rounds is reported.

* MFU = 6 N tokens/s / peak, N = the base model's parameter count (embeddings included, adapters not),
  the usual model-FLOPs convention for every method (adapters skip the frozen weights' gradients, ~2N of the
  6N, so their MFU understates the hardware's work; the ratios to LoRA are the tokens/s ratios).
  Peaks: NVIDIA's H100/H200 SXM dense BF16 spec, 989 TFLOP/s, and ~790 TFLOP/s measured on the H200
  (the device docs); both are printed. `--peak-tflops` overrides the first.
* Peak GPU memory: torch.cuda.max_memory_allocated after the timed steps (reset after building).
* Batch: `--batch` sequences (default 16 = 32k tokens per step); if full FT runs out of memory the batch is
  halved for every method, so all methods share one batch.

    python benchmarks/gpu_throughput.py --json out.json --md out.md    # the GPU measurement (~1-2 min on an H200)
    python benchmarks/gpu_throughput.py --dry-run --json out.json      # tiny-llama on CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from harness import compose, method_overrides

SPEC_PEAK_TFLOPS = 989.0  # NVIDIA H100/H200 SXM, dense BF16 (no sparsity)
MEASURED_PEAK_TFLOPS = 790.0  # bf16 matmul peak measured on the H200 (device docs)
# (method, rank, model.quantization)
CASES = [
    ("full", 0, "none"),
    ("lora", 8, "none"),
    ("mora_sharing", 8, "none"),
    ("mora_rope", 8, "none"),
    ("mora_sharing", 256, "none"),
    ("mora_rope", 256, "none"),
]
# --quantized: QMoRA vs QLoRA on an nf4 base (bf16 compute), and MoRA on the bf16 base beside them.
QUANTIZED_CASES = [("lora", 8, "nf4"), ("mora_rope", 8, "nf4"), ("mora_rope", 8, "none")]


def label(method: str, rank: int, quantization: str = "none") -> str:
    name = "full FT" if method == "full" else f"{method.replace('_', ' ')} r={rank}"
    return name if quantization == "none" else f"{name}, {quantization} base"


def measure(method: str, rank: int, opts: argparse.Namespace, device, quantization: str = "none") -> dict:
    import torch

    from mora_train.adapters import build_adapter
    from mora_train.adapters.base import count_parameters
    from mora_train.models import load_model_and_tokenizer

    overrides = [f"model={opts.model}", "model.tokenizer=byte", *method_overrides(method, max(rank, 1))]
    if opts.model != "tiny-llama":
        overrides.append(f"model.random_init.max_position_embeddings={max(opts.seq, 1024)}")
    if quantization != "none":
        compute = "bfloat16" if opts.precision == "bf16" else "float32"
        overrides += [f"model.quantization={quantization}", f"model.quantization_options.compute_dtype={compute}"]
    cfg = compose(overrides)
    with torch.device(device):  # random init straight on the device: seconds instead of a CPU init + copy
        model, _ = load_model_and_tokenizer(cfg.model)
        base_params = count_parameters(model)[1]
        model = build_adapter(model, cfg.adapter, cfg.rank).model
    if quantization == "none":
        model.to(device)  # a bitsandbytes model is placed by its loader and refuses .to()
    model.train()
    trainable, _ = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (opts.batch, opts.seq), device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(opts.warmup + opts.steps):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= opts.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = opts.batch * opts.seq / step_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del model, optimizer, params, ids, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "method": method,
        "rank": rank if method != "full" else None,
        "label": label(method, rank, quantization),
        "quantization": quantization,
        "base_params": base_params,
        "trainable_params": trainable,
        "batch": opts.batch,
        "seq": opts.seq,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "peak_gpu_memory_gib": peak,
        "mfu_spec": 6 * base_params * tokens_per_s / (opts.peak_tflops * 1e12),
        "mfu_measured_peak": 6 * base_params * tokens_per_s / (MEASURED_PEAK_TFLOPS * 1e12),
    }


def is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def table(result: dict) -> str:
    lines = [
        (
            f"Throughput: model {result['model']} (N = {result['base_params'] / 1e6:,.1f} M parameters), "
            f"{result['precision']}, seq {result['seq']}, batch {result['batch']}, "
            f"{result['rounds']} round(s) x {result['steps']} timed steps, {result['device_name']}. "
            f"MFU = 6 N tokens/s / peak; peak {result['peak_tflops']:.0f} TFLOP/s (dense BF16 spec) "
            f"and {MEASURED_PEAK_TFLOPS:.0f} TFLOP/s (measured)."
        ),
        "",
        (
            "| method | trainable params | tokens/s | vs LoRA | MFU (spec peak) | "
            "MFU (measured peak) | peak GPU GiB | peak GiB vs LoRA |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['label']} | | failed: {row['error'][:80]} | | | | | |")
            continue
        peak, memory_ratio = row["peak_gpu_memory_gib"], row.get("memory_vs_lora")
        lines.append(
            f"| {row['label']} | {row['trainable_params'] / 1e6:.2f} M | {row['tokens_per_s']:.0f} | "
            f"{row.get('speed_vs_lora', float('nan')):.2f}x | {row['mfu_spec']:.2%} | {row['mfu_measured_peak']:.2%} | "
            f"{'-' if peak is None else f'{peak:.1f}'} | "
            f"{'-' if memory_ratio is None else f'{memory_ratio:.2f}x'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dry-run", "--quick", action="store_true", help="tiny-llama on CPU, seq 64, batch 2: checks the script"
    )
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs=2, default=[8, 256], metavar=("SMALL", "LARGE"))
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=SPEC_PEAK_TFLOPS)
    parser.add_argument("--quantized", action="store_true", help="QMoRA vs QLoRA on an nf4 base, and bf16 MoRA")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every measurement)")
    parser.add_argument("--md", type=Path, help="write the markdown table here")
    opts = parser.parse_args()
    import torch

    if opts.dry_run:
        opts.model, opts.seq, opts.batch, opts.steps = "tiny-llama", 64, 2, 2
        opts.warmup, opts.rounds, opts.ranks = 1, 1, [4, 16]
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("gpu_throughput: no CUDA device; use --dry-run on CPU")
    small, large = opts.ranks
    cases = [(m, {8: small, 256: large}.get(r, r), q) for m, r, q in (QUANTIZED_CASES if opts.quantized else CASES)]
    result = {
        "model": opts.model,
        "precision": opts.precision,
        "seq": opts.seq,
        "batch": opts.batch,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "rounds": opts.rounds,
        "peak_tflops": opts.peak_tflops,
        "measured_peak_tflops": MEASURED_PEAK_TFLOPS,
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__,
        "base_params": 0,
        "rows": [],
        "per_round": [],
    }

    def save() -> None:
        if opts.json:
            opts.json.write_text(json.dumps(result, indent=1))
        if opts.md and result["rows"]:
            opts.md.write_text(table(result) + "\n")

    rng = random.Random(0)
    for round_no in range(opts.rounds):
        order = list(cases)
        rng.shuffle(order)
        # Full FT first: it needs the most memory and fixes the batch.
        if round_no == 0 and ("full", 0, "none") in order:
            order.remove(("full", 0, "none"))
            order.insert(0, ("full", 0, "none"))
        measured = {}
        for method, rank, quantization in order:
            while True:
                try:
                    row = measure(method, rank, opts, device, quantization)
                    break
                except Exception as err:  # noqa: BLE001 - recorded in the table, the other methods go on
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if is_oom(err) and round_no == 0 and method == "full" and opts.batch > 1:
                        opts.batch //= 2
                        result["batch"] = opts.batch
                        print(f"full FT out of memory: batch halved to {opts.batch}", flush=True)
                        continue
                    row = {
                        "method": method,
                        "rank": rank,
                        "label": label(method, rank, quantization),
                        "error": f"{type(err).__name__}: {err}",
                    }
                    break
            measured[(method, rank, quantization)] = row
            result["base_params"] = row.get("base_params", result["base_params"])
            print(json.dumps({"round": round_no, **row}), flush=True)
        # The LoRA row on the same kind of base (nf4 with --quantized) is the reference.
        lora = next((row for (m, _, _), row in measured.items() if m == "lora"), {})
        for row in measured.values():
            if "error" not in row and "error" not in lora and lora:
                row["speed_vs_lora"] = row["tokens_per_s"] / lora["tokens_per_s"]
                if row["peak_gpu_memory_gib"] and lora["peak_gpu_memory_gib"]:
                    row["memory_vs_lora"] = row["peak_gpu_memory_gib"] / lora["peak_gpu_memory_gib"]
        result["per_round"].append([measured[c] for c in cases])
        # Summary rows: the median over the rounds so far, per method.
        rows = []
        for case in cases:
            runs = [r[cases.index(case)] for r in result["per_round"] if "error" not in r[cases.index(case)]]
            if not runs:
                rows.append(result["per_round"][-1][cases.index(case)])
                continue
            row = dict(runs[-1])
            for key in ("tokens_per_s", "step_s", "mfu_spec", "mfu_measured_peak", "speed_vs_lora", "memory_vs_lora"):
                values = [r[key] for r in runs if r.get(key) is not None]
                row[key] = statistics.median(values) if values else None
            peaks = [r["peak_gpu_memory_gib"] for r in runs if r.get("peak_gpu_memory_gib") is not None]
            row["peak_gpu_memory_gib"] = max(peaks) if peaks else None
            rows.append(row)
        result["rows"] = rows
        save()
    print(table(result))
    failed = [r["label"] for r in result["rows"] if "error" in r]
    if failed:
        sys.exit(f"gpu_throughput: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""Fine-tune the same job under each distributed engine; compare speed, memory and the merged checkpoints.

Full run (one CUDA GPU, DeepSpeed installed: pip install -e '.[deepspeed]'), SmolLM2-135M, MoRA and LoRA
under DDP (distributed=none), ZeRO-2, ZeRO-3 and FSDP, each launched with scripts/launch.sh --gpus 1:

    python benchmarks/distributed_engines.py --out /tmp/engines

Quick check on CPU (tiny random model, 2 processes, the engines that run on CPU: none, zero2, zero3):

    python benchmarks/distributed_engines.py --quick --out /tmp/engines-quick

Every run's merged/ checkpoint is reloaded with plain transformers and its logits on a fixed batch are
compared with those of the first engine's run for the same adapter (bf16 runs differ by bf16 rounding:
the engines reduce gradients in different orders). Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FULL_JOB = ["model=smollm2-135m", "trainer.precision=bf16", "trainer.max_steps=60", "task.num_pairs=16"]
QUICK_JOB = [
    "model=tiny-llama",
    "task.num_pairs=8",
    "trainer.max_steps=12",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.lr_scheduler=constant",
    "task.eval.max_samples=4",
]
ADAPTERS = {"mora": ["adapter=mora", "rank=8"], "lora": ["adapter=lora", "rank=8"]}


def launch(processes: list[str], job: list[str], run_dir: Path) -> tuple[int, str, float]:
    command = ["bash", str(REPO / "scripts" / "launch.sh"), *processes, *job, f"output_dir={run_dir}", "overwrite=true"]
    started = time.time()
    # check=False: the caller gets the return code and records a failed engine as a row.
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, check=False
    )
    (run_dir.parent / f"{run_dir.name}.log").write_text(result.stdout + result.stderr)
    return result.returncode, result.stderr[-1500:], time.time() - started


@torch.no_grad()
def merged_logits(merged_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(["Key: 0f3c\nValue:", "The quick brown fox"], return_tensors="pt", padding=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model, 2 processes")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--engines", nargs="*", help="distributed= options (default: all that can run here)")
    args = parser.parse_args()

    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if args.quick:
        job, processes = QUICK_JOB, ["--cpu", "2"]
        engines = args.engines or ["none"] + (["zero2", "zero3"] if has_deepspeed else [])
    else:
        if not torch.cuda.is_available():
            sys.exit("the full benchmark needs a CUDA GPU; use --quick on CPU")
        job, processes = FULL_JOB, ["--gpus", "1"]
        engines = args.engines or ["none", "zero2", "zero3", "fsdp"]
        if not has_deepspeed:
            sys.exit("install DeepSpeed first: pip install -e '.[deepspeed]'")
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for adapter, adapter_args in ADAPTERS.items():
        reference = None
        for engine in engines:
            run_dir = args.out / f"{adapter}-{engine}"
            # distributed=none under a 1-GPU launcher is plain single-process training (DDP of one).
            code, tail, wall = launch(processes, [*job, *adapter_args, f"distributed={engine}"], run_dir)
            if code != 0:
                rows.append(f"| {adapter} | {engine} | failed (exit {code}) | | | | | |")
                print(f"{adapter} {engine} failed:\n{tail}", file=sys.stderr)
                continue
            metrics = json.loads((run_dir / "metrics.json").read_text())
            logits = merged_logits(run_dir / "merged")
            if reference is None:
                reference = logits
            diff = (logits - reference).abs().max().item()
            peak = (metrics.get("run") or {}).get("peak_gpu_memory_gib")
            rows.append(
                f"| {adapter} | {metrics['run']['engine']} | {metrics['tokens_per_s']:.0f} | "
                f"{'-' if peak is None else f'{peak:.2f}'} | {metrics['train_loss']:.4f} | "
                f"{metrics['merge_max_abs_diff']:.1e} | {diff:.1e} | {wall:.0f} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| adapter | engine | train tokens/s | peak GPU GiB | train loss | "
        "merge check | merged logits vs first engine | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

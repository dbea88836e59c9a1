"""Every task recipe end to end on the tiny model with a slice of ../shared/data; standalone evaluation; bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mora_train.cli.train import _run
from tests.conftest import SHARED_DATA, compose_config
from tests.conftest import run_evaluation as run_eval
from tests.conftest import run_pipeline as run

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"{SHARED_DATA} is absent: the task integration tests read slices of the shared datasets",
)

TINY_TASK_RUN = [
    "model=tiny-llama",
    "adapter=lora",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.micro_batch_size=2",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.lr_scheduler=constant",
]
GSM8K_SLICE = [
    "task=gsm8k",
    "trainer.max_seq_len=256",
    "task.too_long=truncate",
    "task.data.train.limit=8",
    "task.eval.max_samples=2",
    "task.eval.batch_size=2",
    "task.eval.max_new_tokens=8",
]


def run_task(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    run_dir = tmp_path / name
    cfg = compose_config([*TINY_TASK_RUN, f"task.cache_dir={tmp_path / 'cache'}", *overrides], run_dir)
    return run(cfg), run_dir


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def gsm8k_run(tmp_path_factory) -> tuple[dict, Path]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return run_task(tmp_path_factory.mktemp("gsm8k"), "run", *GSM8K_SLICE)


@needs_shared_data
def test_gsm8k(gsm8k_run) -> None:
    metrics, run_dir = gsm8k_run
    assert metrics["task"] == "gsm8k" and metrics["primary_metric"] == "accuracy"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_samples"] == 2 and metrics["train_steps"] == 2
    predictions = lines(run_dir / "predictions.jsonl")
    assert [p["gold"] for p in predictions] == ["18", "3"]  # the first two GSM8K test answers
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


@needs_shared_data
def test_metamath_on_metamath_format_records(tmp_path: Path) -> None:
    # MetaMathQA itself is not in ../shared/data: GSM8K rows rewritten in its query/response format stand in.
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]]
    train = tmp_path / "metamath.jsonl"
    train.write_text(
        "".join(
            json.dumps({"query": r["question"], "response": r["answer"].replace("####", "The answer is:")}) + "\n"
            for r in rows
        )
    )
    metrics, run_dir = run_task(
        tmp_path,
        "metamath",
        "task=metamath",
        "task.data.train.hub=null",
        f"task.data.train.path={train}",
        "trainer.max_seq_len=256",
        "task.too_long=truncate",
        "task.eval.max_samples=2",
        "task.eval.batch_size=2",
        "task.eval.max_new_tokens=8",
    )
    assert metrics["task"] == "metamath" and metrics["eval_samples"] == 2
    assert len(lines(run_dir / "predictions.jsonl")) == 2


@needs_shared_data
def test_instruction(tmp_path: Path) -> None:
    metrics, run_dir = run_task(
        tmp_path,
        "instruction",
        "task=instruction",
        "trainer.max_seq_len=512",
        "task.data.train.limit=8",
        "task.eval.max_samples=4",
        "task.eval.num_generations=1",
        "task.eval.max_new_tokens=8",
    )
    assert (
        metrics["primary_metric"] == "eval_loss" and math.isfinite(metrics["eval_loss"]) and metrics["eval_tokens"] > 0
    )
    sample = lines(run_dir / "samples.jsonl")
    assert len(sample) == 1 and sample[0]["prompt"].endswith("### Assistant:\n") and sample[0]["reference"]


@needs_shared_data
@pytest.mark.parametrize(
    "task,benchmarks,slice_train",
    [
        (
            "biomed",
            ["pubmedqa", "medqa_usmle", "mmlu_medical"],
            ["task.data.train.0.limit=4", "task.data.train.1.limit=4"],
        ),
        ("finance", ["financial_phrasebank", "twitter_sentiment", "gold_headline"], ["task.data.train.limit=16"]),
    ],
)
def test_continual_pretraining(tmp_path: Path, task: str, benchmarks: list[str], slice_train: list[str]) -> None:
    limits = [f"task.benchmarks.{b}.max_samples=2" for b in benchmarks]
    metrics, run_dir = run_task(
        tmp_path,
        task,
        f"task={task}",
        "trainer.max_seq_len=128",
        "task.eval.max_samples=2",
        "task.eval.max_len=256",
        *slice_train,
        *limits,
    )
    assert metrics["primary_metric"] == "benchmark_mean_accuracy"
    assert math.isfinite(metrics["eval_perplexity"]) and metrics["eval_tokens"] > 0
    for b in benchmarks:
        assert metrics[f"{b}_samples"] == 2 and 0.0 <= metrics[f"{b}_accuracy"] <= 1.0
    assert metrics["benchmark_mean_accuracy"] == pytest.approx(sum(metrics[f"{b}_accuracy"] for b in benchmarks) / 3)
    assert len(lines(run_dir / "benchmark_predictions.jsonl")) == 6


@needs_shared_data
def test_standalone_eval_of_run_dir_adapter_and_base_model(gsm8k_run, tmp_path: Path) -> None:
    _train_metrics, run_dir = gsm8k_run
    trained = lines(run_dir / "predictions.jsonl")
    results = {}
    for name, checkpoint in (("run", run_dir), ("adapter", run_dir / "adapter"), ("base", None)):
        overrides = [*TINY_TASK_RUN, *GSM8K_SLICE, "mode=eval"] + ([f"checkpoint={checkpoint}"] if checkpoint else [])
        metrics = run_eval(compose_config(overrides, tmp_path / name))
        assert metrics["mode"] == "eval" and metrics["eval_samples"] == 2
        results[name] = (metrics, lines(tmp_path / name / "predictions.jsonl"))
    assert results["run"][0]["evaluated"].endswith("merged")
    assert "merged into model" in results["adapter"][0]["evaluated"] and results["base"][0]["evaluated"] == "base model"
    # The saved merged model, the adapter merged again and the training run's own evaluation agree exactly.
    completions = [p["completion"] for p in trained]
    assert [p["completion"] for p in results["run"][1]] == completions
    assert [p["completion"] for p in results["adapter"][1]] == completions


# The CLI's job function, in this process: what it prints and its exit code are the command's (the command's
# own start-up, Hydra's composition and its errors, is tests/integration/test_cli_errors.py's).
def run_job(overrides: list[str], run_dir: Path) -> int:
    try:
        _run(compose_config(overrides, run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


@needs_shared_data
def test_cli_eval_mode_prints_the_metric(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_job([*TINY_TASK_RUN, *GSM8K_SLICE, "mode=eval", f"task.cache_dir={tmp_path}/c"], tmp_path / "eval") == 0
    out = capsys.readouterr().out
    assert "evaluated: base model on task gsm8k" in out and "accuracy:" in out


def test_cli_bad_data_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": \n')
    code = run_job([*TINY_TASK_RUN, "task=gsm8k", f"task.data.train={bad}", f"task.data.eval={bad}"], tmp_path / "run")
    captured = capsys.readouterr()
    assert code == 2
    assert f"{bad} line 2: not valid JSON" in captured.err
    assert "Traceback" not in captured.err + captured.out

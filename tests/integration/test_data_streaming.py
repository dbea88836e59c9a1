"""Streaming pretraining (task.data.streaming=true) end to end on the tiny model: training reads the stream, and a
run stopped mid-way resumes at the position it had reached (the same per-step losses and weights as a run that
was never stopped), and weighted sources train through the CLI's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mora_train.cli.train import _run
from tests.conftest import compose_config
from tests.support.faults import inject

MAX_STEPS = 5


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"text": f"document {i}: " + "abc " * (i % 9)} for i in range(120)]
    (folder / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "other.txt").write_text("\n\n".join(f"paragraph {i} " + "xyz " * (i % 5) for i in range(60)))
    (folder / "eval.txt").write_text("held out text\n")


def run_args(folder: Path, *overrides: str) -> list[str]:
    return [
        "model=tiny-llama",
        "adapter=lora",
        "rank=4",
        "adapter.dropout=0.1",
        "task=pretrain",
        f"task.data.train={folder / 'train.jsonl'}",
        f"task.data.eval={folder / 'eval.txt'}",
        "task.data.streaming=true",
        f"task.cache_dir={folder / 'cache'}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.batch_size=2",
        "trainer.micro_batch_size=1",
        "trainer.max_seq_len=32",
        "trainer.learning_rate=1e-2",
        "trainer.lr_scheduler=constant",
        "trainer.warmup_steps=0",
        "trainer.logging_steps=1",
        "trainer.save_steps=0",
        *overrides,
    ]


def run_in_process(run_dir: Path, args: list[str]) -> int:
    try:
        _run(compose_config(args, run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(run_dir, run_args(corpus)) == 0
    return run_dir


def test_a_streamed_run_trains_for_max_steps(reference: Path) -> None:
    metrics = json.loads((reference / "metrics.json").read_text())
    assert [s for s, _ in step_losses(reference)] == list(range(1, MAX_STEPS + 1))
    assert metrics["eval_tokens"] > 0 and metrics["train_loss"] > 0


def test_a_stopped_stream_resumes_where_it_was(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    inject(monkeypatch, "sigint@step=3")  # finishes step 3, saves checkpoint-3, stops
    assert run_in_process(run_dir, run_args(corpus)) == 130
    assert (run_dir / "checkpoints" / "checkpoint-3").is_dir() and not (run_dir / "metrics.json").exists()
    monkeypatch.undo()
    assert run_in_process(run_dir, run_args(corpus)) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["resumed_from_step"] == 3
    # The same blocks in the same order after the resume: the same losses and the same trained weights.
    ours_losses, ref_losses = step_losses(run_dir), step_losses(reference)
    assert [s for s, _ in ours_losses] == [s for s, _ in ref_losses] == list(range(1, MAX_STEPS + 1))
    assert [loss for _, loss in ours_losses] == pytest.approx([loss for _, loss in ref_losses], abs=1e-6)
    ours = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    ref = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    assert all(torch.isfinite(v).all() for v in ours.values())


def test_weighted_sources_train_from_the_command_line(corpus: Path, tmp_path: Path) -> None:
    mixed = (
        f"task.data.train=[{{path: {corpus / 'train.jsonl'}, weight: 3}}, "
        f"{{path: {corpus / 'other.txt'}, text_unit: paragraph, weight: 1}}]"
    )
    for streaming in ("true", "false"):
        args = run_args(corpus, mixed, "task.data.mixing_stop=all_exhausted", f"task.data.streaming={streaming}")
        assert run_in_process(tmp_path / streaming, [*args, "trainer.max_steps=2"]) == 0
        assert [s for s, _ in step_losses(tmp_path / streaming)] == [1, 2]

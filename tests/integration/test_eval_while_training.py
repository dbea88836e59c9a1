"""Evaluation while training on the tiny model: eval_loss at every trainer.eval_steps (log, TensorBoard), early
stopping on a run that overfits, trainer.load_best (merged/ is the best checkpoint's model), samples as text in
TensorBoard, and the early-stopping state across a resume and across a kill during the export.

The run learns 8 random UUID pairs and is evaluated on 4 others carved out by task.val_size: nothing of those can
be learned from the 8, so once the format is learned the validation loss stops improving while the training
loss keeps falling, and early stopping ends the run well before trainer.max_steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mora_train.cli.train import summary_line
from mora_train.core.errors import RunStopped
from mora_train.pipeline.run_config import read_run_config
from mora_train.pipeline.train import rebuilt_adapter
from mora_train.training.checkpoints import complete_checkpoints
from tests.conftest import TINY_RUN, compose_config, run_pipeline
from tests.support.faults import inject

MAX_STEPS, EVERY, PATIENCE = 40, 2, 2
OVERFITS = [
    *TINY_RUN,
    "task.num_pairs=12",
    "task.val_size=4",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.learning_rate=3e-2",
    f"trainer.eval_steps={EVERY}",
    f"trainer.save_steps={EVERY}",
    f"trainer.early_stopping_patience={PATIENCE}",
    "trainer.load_best=true",
    "trainer.sample_every=4",
    "trainer.num_samples=2",
    "task.eval.max_samples=2",
]
PROBE = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 40, 41, 42]])


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "log_history.json").read_text())


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in history(run_dir) if "eval_loss" in h}


def merged_logits(run_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    with torch.no_grad():
        return model(PROBE).logits


def checkpoint_logits(run_dir: Path, checkpoint: Path) -> torch.Tensor:
    """The model of a checkpoint: a fresh base with the run's adapter, its trained weights loaded from it."""
    config = read_run_config(compose_config(OVERFITS, run_dir))[0]
    adapter = rebuilt_adapter(config)
    adapter.load_weights(checkpoint)
    adapter.model.eval()
    with torch.no_grad():
        return adapter.model(PROBE).logits


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("overfit") / "run"
    return run_dir, run_pipeline(compose_config(OVERFITS, run_dir))


def test_eval_loss_is_logged_at_every_eval_step_to_the_log_and_tensorboard(overfit) -> None:
    run_dir, metrics = overfit
    losses = eval_losses(run_dir)
    assert list(losses) == list(range(EVERY, metrics["train_steps"] + 1, EVERY))
    scalars = {event.step: event.value for event in tensorboard(run_dir).Scalars("eval/loss")}
    assert scalars == pytest.approx(losses, rel=1e-6)
    assert (run_dir / "loss.png").stat().st_size > 0


def test_a_run_that_overfits_stops_early_at_the_patience(overfit) -> None:
    run_dir, metrics = overfit
    stopped, losses = metrics["train_steps"], eval_losses(run_dir)
    assert stopped < MAX_STEPS and metrics["run"]["early_stopped_at_step"] == stopped
    # the training loss kept falling while the validation loss did not
    train = [h["loss"] for h in history(run_dir) if "loss" in h]
    assert train[-1] < train[0] - 0.1
    best_step, best = min(losses.items(), key=lambda item: item[1])
    assert (metrics["best_step"], metrics["best_eval_loss"]) == (best_step, pytest.approx(best))
    last = [losses[step] for step in sorted(losses)[-PATIENCE:]]
    assert best_step < stopped - EVERY * (PATIENCE - 1) and all(loss >= best for loss in last)
    assert f"stopped early at step {stopped}" in summary_line(metrics, run_dir)


def test_load_best_makes_merged_the_best_checkpoints_model(overfit) -> None:
    run_dir, metrics = overfit
    best_step, stopped = metrics["best_step"], metrics["train_steps"]
    assert metrics["run"]["weights_step"] == best_step and f"merged model: step {best_step} (the best)" in (
        summary_line(metrics, run_dir)
    )
    kept = {p.name for p in complete_checkpoints(run_dir / "checkpoints")}
    assert {f"checkpoint-{best_step}", f"checkpoint-{stopped}"} <= kept  # the best outlives rotation (limit 2)
    merged = merged_logits(run_dir)
    best = checkpoint_logits(run_dir, run_dir / "checkpoints" / f"checkpoint-{best_step}")
    last = checkpoint_logits(run_dir, run_dir / "checkpoints" / f"checkpoint-{stopped}")
    assert (merged - best).abs().max().item() < 1e-4
    assert (merged - last).abs().max().item() > 100 * (merged - best).abs().max().item()  # not the last step's


def test_samples_are_logged_as_text_to_tensorboard(overfit) -> None:
    run_dir, metrics = overfit
    events = tensorboard(run_dir)
    texts = {event.step: event.tensor_proto.string_val[0].decode() for event in events.Tensors("samples/text_summary")}
    assert list(texts) == list(range(4, metrics["train_steps"] + 1, 4))
    for step, text in texts.items():
        assert f"### step {step}" in text and text.count("**sample") == 2
        assert "    Key: " in text and "Value:" in text  # the validation prompts, then generated and reference text


def test_a_kill_during_the_export_of_an_early_stopped_run_resumes_into_its_best_weights(overfit, tmp_path) -> None:
    run_dir, metrics = overfit
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("metrics.json", "merged", "adapter"):  # what a kill during the export leaves unwritten
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = run_pipeline(compose_config(OVERFITS, copy))
    assert (
        again["train_steps"] == metrics["train_steps"] and again["run"]["resumed_from_step"] == metrics["train_steps"]
    )
    assert history(copy) == history(run_dir)  # no step trained again
    assert again["run"]["weights_step"] == metrics["best_step"] and again["best_step"] == metrics["best_step"]
    assert again["run"]["early_stopped_at_step"] == metrics["train_steps"]
    assert (merged_logits(copy) - merged_logits(run_dir)).abs().max().item() < 1e-5


def test_a_resumed_run_continues_the_patience_count(overfit, tmp_path, monkeypatch) -> None:
    """Interrupted one step before the reference run stopped (one evaluation short of the patience): the resumed
    run stops where the reference did, which a fresh count could not (it needs PATIENCE more evaluations)."""
    reference_dir, reference = overfit
    stopped = reference["train_steps"]
    run_dir = tmp_path / "run"
    inject(monkeypatch, f"sigint@step={stopped - 1}")
    with pytest.raises(RunStopped):
        run_pipeline(compose_config(OVERFITS, run_dir))
    saved = json.loads((run_dir / "checkpoints" / f"checkpoint-{stopped - 1}" / "trainer_state.json").read_text())
    counter = saved["stateful_callbacks"]["EarlyStopping"]["attributes"]["early_stopping_patience_counter"]
    assert counter == PATIENCE - 1
    resumed = run_pipeline(compose_config(OVERFITS, run_dir))
    assert resumed["run"]["resumed_from_step"] == stopped - 1
    assert resumed["train_steps"] == stopped and resumed["run"]["early_stopped_at_step"] == stopped
    assert stopped < (stopped - 1) + EVERY * PATIENCE  # a count started afresh at the resume stops later
    assert eval_losses(run_dir) == pytest.approx(eval_losses(reference_dir), abs=1e-5)
    assert resumed["run"]["weights_step"] == reference["best_step"]


@pytest.mark.multiprocess
def test_two_process_run_evaluates_stops_and_loads_the_best_on_every_rank(overfit, tmp_path) -> None:
    """DDP (2 CPU processes): the same evaluations, stop and best step as one process, and both ranks end on the
    best checkpoint's weights (each loads it; the replica checksums agree)."""
    single_dir, single = overfit
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*launch, "-m", "mora_train", *OVERFITS, f"output_dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["world_size"] == 2 and metrics["train_steps"] == single["train_steps"]
    assert metrics["best_step"] == single["best_step"] == metrics["run"]["weights_step"]
    checksums = metrics["run"]["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "a rank did not end on the best checkpoint"
    # the best step's model, as one process trained it (up to the reduction order of two processes)
    assert (merged_logits(run_dir) - merged_logits(single_dir)).abs().max().item() < 1e-3

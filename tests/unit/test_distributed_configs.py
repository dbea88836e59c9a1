"""Every shipped distributed config is accepted by what consumes it, and impossible combinations are refused.

Hydra options (configs/distributed/*.yaml) go through our validate(); DeepSpeed JSONs through the
Trainer's DeepSpeed config processing and DeepSpeed's own validation (skipped without DeepSpeed, an
optional extra); FSDP settings through TrainingArguments and Accelerate's FSDP plugin; the accelerate
launcher files through `accelerate launch`'s argument handling. No GPU and no process group needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mora_train.core.errors import ConfigError, MoraTrainError
from mora_train.pipeline.run_config import RunConfig, load_run_config
from mora_train.training import distributed, distributed_config
from mora_train.training.distributed_config import DistributedConfig
from tests.conftest import CONFIG_DIR, REPO, TINY_RUN, compose_config
from tests.conftest import validate_config as validate

DIST_DIR = CONFIG_DIR / "distributed"
OPTIONS = sorted(p.stem for p in DIST_DIR.glob("*.yaml"))
DEEPSPEED_JSONS = sorted(p.name for p in (DIST_DIR / "deepspeed").glob("*.json"))
LAUNCHER_JSONS = sorted(p.name for p in (DIST_DIR / "accelerate").glob("*.json"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "DeepSpeed is an optional extra (pip install 'mora-train[deepspeed]'), not installed here"


@pytest.fixture
def clean_env():
    """Restore os.environ afterwards: TrainingArguments and Accelerate's plugins export settings to it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a DeepSpeed TrainingArguments would otherwise leave ZeRO-3 "on" in-process


@pytest.fixture
def launched(monkeypatch):
    """The environment a launcher (accelerate launch / torchrun) gives a single-process run."""
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


def sections(*overrides: str) -> RunConfig:
    """The typed sections of a tiny run (each section checked on its own; the engine's launch checks not run)."""
    return load_run_config(compose_config([*TINY_RUN, *overrides]))


def problems_of(*overrides: str) -> list[str]:
    try:
        validate(compose_config([*TINY_RUN, *overrides]))
    except ConfigError as err:
        return err.problems
    return []


def test_shipped_options_cover_every_engine() -> None:
    assert set(OPTIONS) >= {"none", "ddp", "fsdp", "zero2", "zero3", "zero3_offload", "multinode"}
    assert compose_config([]).distributed.name == "none"  # the default: one process, or DDP under a launcher
    assert sections().distributed == DistributedConfig()  # none.yaml restates the section's defaults
    assert set(DEEPSPEED_JSONS) == {"zero2.json", "zero3.json", "zero3_offload.json"}
    assert set(LAUNCHER_JSONS) == {"single_gpu.json", "multi_gpu.json", "multi_node.json"}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_composes_and_validates_under_a_launcher(option: str, launched: None) -> None:
    cfg = compose_config([*TINY_RUN, f"distributed={option}"])
    assert cfg.distributed.name == option
    assert (DIST_DIR / f"{option}.yaml").read_text().startswith("#"), "config files start with a header comment"
    problems = problems_of(f"distributed={option}")
    if cfg.distributed.backend == "deepspeed" and not HAS_DEEPSPEED:
        assert len(problems) == 1 and "pip install 'mora-train[deepspeed]'" in problems[0]
    elif cfg.distributed.backend == "fsdp" and not torch.cuda.is_available():
        assert len(problems) == 1 and "needs CUDA GPUs" in problems[0]
    else:
        assert problems == []


@pytest.mark.parametrize("name", DEEPSPEED_JSONS)
def test_deepspeed_json_is_complete_and_leaves_trainer_numbers_to_auto(name: str) -> None:
    config = json.loads((DIST_DIR / "deepspeed" / name).read_text())
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key  # the Trainer fills them from trainer.* (one source of truth)
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    stage = config["zero_optimization"]["stage"]
    assert stage in (2, 3)
    if stage == 3:  # full fine-tuning checkpoints need the gathered 16-bit weights
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
@pytest.mark.parametrize("option", ["zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_accepts_the_config_the_trainer_builds(
    option: str, precision: str, clean_env: None, tmp_path: Path
) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments

    from mora_train.models import load_model_and_tokenizer

    run = sections(f"distributed={option}", f"trainer.precision={precision}")
    # Before the TrainingArguments: while a ZeRO-3 one exists, transformers builds models under zero.Init.
    model, _ = load_model_and_tokenizer(run.model)
    kwargs = distributed_config.training_arguments_kwargs(run.distributed, run.trainer)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        bf16=precision == "bf16",
        **kwargs,
    )
    hf_config = args.hf_deepspeed_config
    hf_config.trainer_config_finalize(args, model, num_training_steps=10)  # fills the model-size "auto"s
    assert "auto" not in json.dumps(hf_config.config)
    ds = DeepSpeedConfig(hf_config.config)  # DeepSpeed's own (pydantic) validation
    assert (
        ds.zero_optimization_stage
        == json.loads((DIST_DIR / run.distributed.deepspeed_config).read_text())["zero_optimization"]["stage"]
    )
    assert ds.train_batch_size == 8 and ds.bfloat16_config.enabled == (precision == "bf16")


def test_fsdp_settings_build_accelerates_fsdp2_plugin_with_its_own_checkpointing(
    clean_env: None, tmp_path: Path
) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    run = sections("distributed=fsdp", "trainer.gradient_checkpointing=true")
    kwargs = distributed_config.training_arguments_kwargs(run.distributed, run.trainer)
    # trainer.gradient_checkpointing becomes FSDP's activation checkpointing (the Trainer refuses both).
    assert kwargs["activation_checkpointing"] is False and kwargs["fsdp_config"]["activation_checkpointing"] is True
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.activation_checkpointing
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and plugin.cpu_ram_efficient_loading is False


def _launch_args(*argv: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*argv, "-m", "mora_train"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("name", LAUNCHER_JSONS)
def test_accelerate_accepts_the_launcher_configs(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = str(DIST_DIR / "accelerate" / name)
    config = load_config_from_file(path)  # rejects unknown keys and bad enum values
    assert str(config.distributed_type).endswith("MULTI_GPU")  # torchrun-style launch: LOCAL_RANK even for 1 GPU
    args, _ = _launch_args("--config_file", path)
    assert args.multi_gpu and args.num_processes == config.num_processes and args.num_machines == config.num_machines


def test_multi_node_template_builds_the_torchrun_environment_for_node_1() -> None:
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args(
        "--config_file",
        str(DIST_DIR / "accelerate" / "multi_node.json"),
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.1.2.3",
        "--main_process_port",
        "29555",
    )
    env = prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    # Static rendezvous at node 0's address (accelerate only reads --same_network from the command line).
    assert args.rdzv_backend == "static" and args.rdzv_endpoint == "10.1.2.3:29555"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def launch_sh(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "launch.sh"), *argv], capture_output=True, text=True, env=env, timeout=60
    )


def test_launch_script_builds_the_documented_commands() -> None:
    one = launch_sh("--print", "--gpus", "1", "distributed=zero3").stdout
    assert "accelerate.commands.launch --config_file" in one and "single_gpu.json" in one
    assert one.rstrip().endswith("-m mora_train distributed=zero3")
    eight = launch_sh("--print", "--gpus", "8", "distributed=fsdp").stdout
    assert "multi_gpu.json --num_processes 8" in eight
    node1 = launch_sh(
        "--print", "--nodes", "2", "--node-rank", "1", "--main-ip", "10.1.2.3", "--gpus", "8", "x=1"
    ).stdout
    assert "multi_node.json --num_machines 2 --num_processes 16 --machine_rank 1 --main_process_ip 10.1.2.3" in node1
    cpu = launch_sh("--print", "--cpu", "2", "model=tiny-llama").stdout
    assert "--multi_gpu --num_processes 2" in cpu
    missing_ip = launch_sh("--nodes", "2", "distributed=zero3")
    assert missing_ip.returncode == 2 and "--main-ip" in missing_ip.stderr


# -- refusals -----------------------------------------------------------------------------------------


def test_tensor_and_pipeline_parallelism_are_refused_naming_why_for_mora(monkeypatch, launched: None) -> None:
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    problems = problems_of("adapter=mora")
    assert len(problems) == 1
    assert (
        "tensor parallelism (tp_size=2)" in problems[0]
        and "whole input" in problems[0]
        and "adapter=mora" in problems[0]
    )
    monkeypatch.delenv("PARALLELISM_CONFIG_TP_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_MEGATRON_LM", "true")
    assert any("Megatron-LM" in p for p in problems_of("adapter=lora"))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_deepspeed_tensor_or_pipeline_sections_are_refused(launched: None) -> None:
    problems = problems_of(
        "adapter=mora", "distributed=zero3", "+distributed.deepspeed_overrides.tensor_parallel.autotp_size=2"
    )
    assert len(problems) == 1 and "autotp_size=2" in problems[0]
    problems = problems_of("adapter=full", "distributed=zero2", "+distributed.deepspeed_overrides.pipeline.stages=2")
    assert len(problems) == 1 and "pipeline parallelism" in problems[0]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_deepspeed_needs_a_launcher_and_numbers_that_agree_with_trainer(monkeypatch) -> None:
    for key in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    problems = problems_of("distributed=zero2")
    assert len(problems) == 1 and "accelerate launch --num_processes 1" in problems[0]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    problems = problems_of(
        "distributed=zero2",
        "+distributed.deepspeed_overrides.train_batch_size=16",
        "+distributed.deepspeed_overrides.bf16.enabled=true",
    )
    assert len(problems) == 2
    assert "train_batch_size: 16" in problems[0] and '"auto"' in problems[0]
    assert "trainer.precision=fp32" in problems[1]


def test_engine_chosen_twice_and_fsdp_settings_adapters_cannot_use_are_refused(monkeypatch, launched: None) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    problems = problems_of("distributed=fsdp")
    assert any("accelerate launch config selects deepspeed" in p for p in problems)
    assert problems_of("distributed=none") == []  # a user's own DeepSpeed accelerate config is allowed alone
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    problems = problems_of(
        "adapter=mora",
        "distributed=fsdp",
        "distributed.fsdp_config.version=1",
        "+distributed.fsdp_config.use_orig_params=false",
    )
    assert any("use_orig_params=false" in p for p in problems)
    problems = problems_of("distributed=fsdp", "distributed.fsdp_config.cpu_ram_efficient_loading=true")
    assert any("cpu_ram_efficient_loading" in p for p in problems)
    assert any("is unknown" in p for p in problems_of("distributed.backend=megatron"))
    assert any("not a known key" in p for p in problems_of("+distributed.tp_size=2"))


def test_a_quantized_base_is_refused_under_a_sharding_engine(launched: None) -> None:
    from mora_train.adapters.lora import LoraSettings
    from mora_train.training.config import TrainerConfig

    fsdp = DistributedConfig(name="fsdp", backend="fsdp", fsdp_config={"version": 2})
    problems = distributed_config.config_problems(fsdp, TrainerConfig(), LoraSettings(name="lora"), quantization="nf4")
    assert any(
        "`model.quantization=nf4` with `distributed=fsdp` (fsdp)" in p and "distributed=ddp" in p for p in problems
    )
    ddp = DistributedConfig(name="ddp", backend="ddp")
    assert distributed_config.config_problems(ddp, TrainerConfig(), LoraSettings(name="lora"), quantization="nf4") == []


def test_the_section_alone_refuses_a_missing_deepspeed_json_and_fsdp_settings_adapters_cannot_use() -> None:
    missing = DistributedConfig(name="zero9", backend="deepspeed", deepspeed_config="deepspeed/zero9.json")
    (problem,) = missing.check("distributed")
    assert "`distributed.deepspeed_config=deepspeed/zero9.json` does not exist" in problem
    assert DistributedConfig(backend="deepspeed").check("distributed") == [
        "`distributed.deepspeed_config` must name a DeepSpeed JSON file for distributed.backend=deepspeed"
    ]
    assert "must be a mapping" in DistributedConfig(backend="fsdp").check("distributed")[0]
    (version,) = DistributedConfig(backend="fsdp", fsdp_config={"version": 3}).check("distributed")
    assert "`distributed.fsdp_config.version=3` must be 1 or 2" in version
    assert DistributedConfig().check("distributed") == []  # the default: no engine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for CPU-only machines")
def test_fsdp_on_a_cpu_only_machine_is_refused_instead_of_silently_running_ddp(launched: None) -> None:
    problems = problems_of("distributed=fsdp")
    assert len(problems) == 1 and "needs CUDA GPUs" in problems[0] and "zero2/zero3" in problems[0]


# -- single-process behaviour of the helpers ------------------------------------------------------------


def test_single_process_helpers_are_transparent(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--local_rank=3", "adapter=lora", "--local-rank=0"]
    assert distributed.prepare_cli(argv) == ["adapter=lora"]  # the deepspeed launcher's argument is dropped
    assert distributed.run_on_main_process(lambda: 42) == 42
    with pytest.raises(MoraTrainError, match="boom"):
        distributed.run_on_main_process(lambda: (_ for _ in ()).throw(MoraTrainError("boom")))
    from omegaconf import OmegaConf

    from mora_train.cli.train import register_launch_time_resolver

    register_launch_time_resolver()  # the CLI's `${launch_time:...}`, over distributed.launch_time
    stamp = OmegaConf.create({"a": "${launch_time:%Y-%m-%d}", "b": "${launch_time:%H-%M-%S}"})
    assert stamp.a == distributed.launch_time().strftime("%Y-%m-%d") and stamp.b == distributed.launch_time().strftime(
        "%H-%M-%S"
    )


def test_restarts_and_trained_embeddings_are_refused_where_weights_are_sharded_or_copied(launched: None) -> None:
    restarts = [
        "adapter=mora",
        "adapter.mora_type=sharing",
        "trainer.restart.every_steps=4",
        "trainer.restart.mora_types=[1,2]",
    ]
    assert not any("trainer.restart" in p for p in problems_of(*restarts))  # DDP: every rank merges alike
    assert any(
        "trainer.restart.every_steps=4" in p and "distributed=none or ddp" in p
        for p in problems_of(*restarts, "distributed=fsdp")
    )
    embeddings = ["adapter=lora", "trainer.train_embeddings=true"]
    assert any("trainer.train_embeddings=true" in p for p in problems_of(*embeddings, "distributed=fsdp"))
    if HAS_DEEPSPEED:
        assert any("trainer.restart" in p for p in problems_of(*restarts, "distributed=zero2"))
        assert any("train_embeddings" in p for p in problems_of(*embeddings, "distributed=zero3"))
        assert problems_of(*embeddings, "distributed=zero2") == []

"""MoRA on a whole model: save/load round trip, clear errors on the wrong base, official-fork import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mora_train.adapters import build_adapter, load_adapter
from mora_train.adapters.mora.config import MoraSettings
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import read_run_config
from tests.conftest import compose_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def typed_config(*overrides: str):
    run, problems = read_run_config(compose_config(list(overrides)))
    assert problems == []
    return run


def tiny_model(hidden: int = 64, seed: int = 0):
    cfg = typed_config(
        "model=tiny-llama", f"model.random_init.hidden_size={hidden}", f"+model.random_init.init_seed={seed}"
    )
    return load_model_and_tokenizer(cfg.model)


def mora_cfg(mora_type: str = "rope") -> MoraSettings:
    return MoraSettings(name="mora", mora_type=mora_type, target_modules=TARGETS, dropout=0.0)


def randomise(adapter) -> None:
    """Perturb the zero init: equality checks on a zero adapter would pass trivially."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapter.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["Key: 12ab\nValue:", "x"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("mora_type", ["sharing", "rope"])
def test_save_load_round_trip_is_bit_exact(mora_type: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_model()
    adapter = build_adapter(model, mora_cfg(mora_type), rank=4)
    randomise(adapter)
    write_dir_atomically(tmp_path / "adapter", adapter.save)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["format"] == "mora-train" and config["mora_type"] == mora_type
    # Derived tables (RoPE cos/sin, index maps) never reach the checkpoint: only one M per layer.
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(adapter.trainable_parameters())
    assert all(k.endswith(".mora_M") for k in saved)

    fresh, _ = tiny_model()
    reloaded = load_adapter(fresh, tmp_path / "adapter")
    for key, param in adapter.trainable_parameters().items():
        assert torch.equal(param, reloaded.trainable_parameters()[key])
    assert torch.equal(logits(adapter.model, tokenizer), logits(reloaded.model, tokenizer))


def test_loading_onto_wrong_base_names_module_and_shapes(tmp_path: Path) -> None:
    model, _ = tiny_model(hidden=64)
    adapter = build_adapter(model, mora_cfg(), rank=4)
    write_dir_atomically(tmp_path / "adapter", adapter.save)
    other, _ = tiny_model(hidden=32)
    with pytest.raises(MoraTrainError) as info:
        load_adapter(other, tmp_path / "adapter")
    message = str(info.value)
    assert "q_proj.mora_M" in message and "saved shape" in message


def test_merge_and_unload_matches_adapted_model() -> None:
    model, tokenizer = tiny_model()
    adapter = build_adapter(model, mora_cfg("rope"), rank=4)
    randomise(adapter)
    before = logits(adapter.model, tokenizer)
    merged = adapter.merge_and_unload()
    assert not any(type(m).__name__ == "MoRALinear" for m in merged.modules())
    assert (logits(merged, tokenizer) - before).abs().max().item() < 1e-5


def write_official_fixture(directory: Path, adapter, rank: int, mora_type: int) -> None:
    """A folder laid out as the official MoRA fork of peft saves it: M as lora_A, the same tensor as lora_B."""
    directory.mkdir()
    tensors = {}
    for key, param in adapter.trainable_parameters().items():
        module = key.removesuffix(".mora_M")
        tensors[f"base_model.model.{module}.lora_A.weight"] = param.detach().clone()
        tensors[f"base_model.model.{module}.lora_B.weight"] = param.detach().clone()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "use_mora": True,
        "mora_type": mora_type,
        "r": rank,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "task_type": "CAUSAL_LM",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("official_type,name", [(1, "sharing"), (6, "rope")])
def test_official_fork_checkpoint_imports_and_merges(official_type: int, name: str, tmp_path: Path) -> None:
    model, tokenizer = tiny_model()
    trained = build_adapter(model, mora_cfg(name), rank=4)
    randomise(trained)
    expected = logits(trained.model, tokenizer)
    write_official_fixture(tmp_path / "official", trained, rank=4, mora_type=official_type)

    fresh, _ = tiny_model()
    imported = load_adapter(fresh, tmp_path / "official")
    assert imported.mora_type == name
    assert torch.equal(logits(imported.model, tokenizer), expected)
    merged = imported.merge_and_unload()
    assert (logits(merged, tokenizer) - expected).abs().max().item() < 1e-5


def test_official_fixture_with_diverging_alias_is_refused(tmp_path: Path) -> None:
    model, _ = tiny_model()
    trained = build_adapter(model, mora_cfg("sharing"), rank=4)
    randomise(trained)
    write_official_fixture(tmp_path / "official", trained, rank=4, mora_type=1)
    tensors = load_file(tmp_path / "official" / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(tmp_path / "official" / "adapter_model.safetensors"))
    fresh, _ = tiny_model()
    with pytest.raises(MoraTrainError, match="lora_A alias"):
        load_adapter(fresh, tmp_path / "official")


@pytest.mark.parametrize(
    "rank,expected",
    [(1, "rope"), (8, "rope"), (64, "rope"), (127, "rope"), (128, "sharing"), (256, "sharing"), (1024, "sharing")],
)
def test_mora_type_auto_follows_the_papers_rule_by_rank(rank: int, expected: str) -> None:
    from mora_train.adapters.mora.layer import choose_mora_type

    assert choose_mora_type("auto", rank) == expected
    assert choose_mora_type("AUTO", rank) == expected
    assert choose_mora_type(1, rank) == "sharing"  # an explicit type is never overridden


def test_mora_type_auto_is_recorded_in_title_adapter_config_and_metrics(tmp_path) -> None:
    from mora_train.adapters import adapter_config_problems
    from mora_train.training.config import RestartConfig, TrainerConfig

    model, _ = load_model_and_tokenizer(typed_config("model=tiny-llama").model)
    settings = MoraSettings(name="mora", mora_type="auto", target_modules=["q_proj"], dropout=0.0)
    assert adapter_config_problems(settings, 8, TrainerConfig()) == []
    adapter = build_adapter(model, settings, 8)
    assert adapter.title() == "mora (rank 8, type rope, chosen by mora_type=auto)"
    described = adapter.describe()
    assert described["mora_type"] == "rope" and described["mora_type_requested"] == "auto"
    write_dir_atomically(tmp_path / "adapter", adapter.save)
    fresh, _ = load_model_and_tokenizer(typed_config("model=tiny-llama").model)
    assert load_adapter(fresh, tmp_path / "adapter").mora_type == "rope"
    cycle = TrainerConfig(restart=RestartConfig(every_steps=4, mora_types=[1, 2]))
    assert adapter_config_problems(settings, 8, cycle) == [
        (
            "`adapter.mora_type=auto` with `trainer.restart.mora_types=[1, 2]`: the restart cycle names the types "
            "itself; set adapter.mora_type to the cycle's first type"
        )
    ]


def test_the_restart_cycle_is_checked_against_mora_type() -> None:
    from mora_train.adapters import adapter_config_problems
    from mora_train.training.config import RestartConfig, TrainerConfig

    def problems(mora_type: str | int, cycle: list | None, every_steps: int = 4, rank: int | None = 8) -> list[str]:
        trainer = TrainerConfig(restart=RestartConfig(every_steps=every_steps, mora_types=cycle))
        return adapter_config_problems(mora_cfg(mora_type), rank, trainer)

    assert problems("sharing", [1, 2]) == []
    assert problems("sharing", None) == []
    assert problems("rope", [1, 2]) == [
        (
            "`trainer.restart.mora_types=[1, 2]` starts with sharing, but `adapter.mora_type=rope`: the restart cycle "
            "starts with adapter.mora_type; set adapter.mora_type=sharing or put rope first in "
            "trainer.restart.mora_types"
        )
    ]
    assert problems("rope", [1, 2], every_steps=0) == []  # no restarts: the cycle is never used
    assert problems("sharing", []) == [
        "`trainer.restart.mora_types=[]` must be a non-empty list such as [1, 2] or [sharing, grouping]"
    ]
    (unknown,) = problems("sharing", ["sharing", "spiral"])
    assert unknown.startswith("`trainer.restart.mora_types`: Unknown MoRA type 'spiral'")
    assert problems("sharing", [1, 2], rank=0) == [
        "`rank=0` must be a positive integer (the LoRA rank; MoRA matches its parameter count)"
    ]


def test_an_unknown_mora_type_is_one_problem_naming_the_key_and_the_fix() -> None:
    _, problems = read_run_config(compose_config(["adapter=mora", "adapter.mora_type=spiral"]))
    (problem,) = problems
    assert problem.startswith("`adapter.mora_type`: Unknown MoRA type 'spiral'")
    assert problem.endswith("or adapter.mora_type=auto (chosen by rank)")

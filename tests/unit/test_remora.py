"""ReMoRA / ReLoRA restarts (mora_train/training/restarts.py) and task=pretrain on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mora_train.adapters import build_adapter
from mora_train.adapters.mora.adapter import MoraAdapter
from mora_train.analysis.spectrum import count_singular_values_above, run_spectrum
from mora_train.core.errors import ConfigError
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import load_run_config
from mora_train.training.config import RestartConfig, TrainerConfig
from mora_train.training.restarts import RestartCallback, restart_lr_factor, restart_problems, setup_training_extras
from tests.conftest import SHARED_DATA, compose_config, compose_run
from tests.conftest import run_pipeline as run
from tests.conftest import validate_config as validate

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")

# ReMoRA as the paper runs it: sharing <-> grouping (types 1 <-> 2), starting with adapter.mora_type.
REMORA_CYCLE = ["adapter.mora_type=sharing", "trainer.restart.mora_types=[sharing,grouping]"]

PRETRAIN_RUN = [
    "task=pretrain",
    "model=llama-tiny",
    "rank=4",
    "task.data.train.0.limit=40",
    "task.data.train.1.limit=1",
    "task.eval.max_samples=3",
    "trainer.max_seq_len=64",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.learning_rate=3e-3",
    "trainer.lr_scheduler=constant_with_warmup",
    "trainer.warmup_steps=2",
    "trainer.logging_steps=1",
    "trainer.max_steps=12",
    "trainer.restart.every_steps=4",
    "trainer.restart.warmup_steps=1",
    "trainer.train_embeddings=true",
]


def tiny_adapter(adapter: str, *overrides: str):
    cycle = REMORA_CYCLE if adapter == "mora" else []
    run_cfg = compose_run(
        [
            "model=llama-tiny",
            f"adapter={adapter}",
            "rank=4",
            "trainer.restart.every_steps=4",
            "trainer.train_embeddings=true",
            *cycle,
            *overrides,
        ]
    )
    model, _ = load_model_and_tokenizer(run_cfg.model)
    built = build_adapter(model, run_cfg.adapter, run_cfg.rank)
    extras = setup_training_extras(built, run_cfg.trainer, seed=0)
    return built, extras


@pytest.mark.parametrize("adapter", ["mora", "lora"])
def test_restart_keeps_the_function_reinitialises_switches_and_keeps_other_optimizer_state(adapter: str) -> None:
    built, extras = tiny_adapter(adapter)
    callback = extras.callbacks[0]
    assert isinstance(callback, RestartCallback)
    model = built.model
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter (the zero init would make the merge check vacuous)
        for p in built.restart_parameters():
            p.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    embed = built.base_model.get_input_embeddings().weight
    assert any(p is embed for p in params), "train_embeddings=true must make the embeddings trainable"
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(3, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    embed_moment = optimizer.state[embed]["exp_avg"].clone()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    callback.restart(optimizer, 1)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-5  # merging ΔW and restarting from zero keeps the function
    layers = {n: built.base_model.get_submodule(n) for n in built.adapted_base_weights()}
    if adapter == "mora":
        assert all(layer.mora_M.abs().max() == 0 for layer in layers.values())
        assert {layer.mora_type for layer in layers.values()} == {"grouping"}  # sharing -> grouping
        assert set(built.operator_types().values()) == {"grouping"} and built.mora_type == "grouping"
    else:
        assert all(layer.lora_B["default"].weight.abs().max() == 0 for layer in layers.values())
        assert all(layer.lora_A["default"].weight.abs().max() > 0 for layer in layers.values())
    for p in built.restart_parameters():
        assert p not in optimizer.state  # adapter moments dropped
    assert torch.equal(optimizer.state[embed]["exp_avg"], embed_moment)  # embedding moments kept
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert float(optimizer.state[embed]["step"]) == 2
    assert all(float(optimizer.state[p]["step"]) == 1 for p in built.restart_parameters())


def _train_layer_to_target(adapter: str, cycles: int, steps_per_cycle: int = 60) -> int:
    """Fit one 64x64 layer to a full-rank target; count singular values of the total ΔW above 0.1."""
    model, _ = load_model_and_tokenizer(compose_run(["model=llama-tiny"]).model)
    name = "model.layers.0.self_attn.q_proj"  # 64 x 64
    start = model.get_submodule(name).weight.detach().clone()
    torch.manual_seed(0)
    target = torch.randn(64, 64) / 2
    if adapter == "mora":
        built = MoraAdapter(model, 4, "sharing", [name])
    else:
        from mora_train.adapters.lora import LoraAdapter

        built = LoraAdapter(model, 4, 4, [name])
    layer = built.base_model.get_submodule(name)
    from mora_train.training.restarts import BaseWeightsState

    cycle = ["sharing", "grouping"] if adapter == "mora" else None  # ReMoRA switches operators at each restart
    settings = RestartConfig(every_steps=steps_per_cycle, mora_types=cycle)
    callback = RestartCallback(built, settings, BaseWeightsState(built, settings, False), seed=0)
    params = built.restart_parameters()
    optimizer = torch.optim.Adam(params, lr=2e-2)
    x = torch.randn(256, 64)
    for step in range(1, cycles * steps_per_cycle + 1):
        loss = ((layer(x) - x @ (start + target).T) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % steps_per_cycle == 0 and step < cycles * steps_per_cycle:
            callback.restart(optimizer, step // steps_per_cycle)
    total = built.adapted_base_weights()[name].detach() - start + built.delta_weights()[name]
    return count_singular_values_above(total, 0.1)


@pytest.mark.parametrize("adapter", ["mora", "lora"])
def test_delta_w_after_three_restarts_has_more_singular_values_above_threshold_than_one_cycle(adapter: str) -> None:
    one, three = _train_layer_to_target(adapter, 1), _train_layer_to_target(adapter, 3)
    assert three > one, (one, three)
    if adapter == "lora":
        assert one <= 4 < three  # one cycle of LoRA r=4 cannot exceed rank 4


def test_restart_learning_rate_rewarms_after_each_restart() -> None:
    jagged = RestartConfig(every_steps=10, warmup_steps=4)
    factors = [restart_lr_factor(jagged, s, 1.0) for s in range(30)]
    assert factors[:10] == [1.0] * 10  # the first cycle keeps the trainer's own schedule
    assert factors[10:15] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and factors[20] == pytest.approx(0.2)
    cosine = RestartConfig(every_steps=10, warmup_steps=0, lr_schedule="cosine_restarts", min_lr_ratio=0.0)
    values = [restart_lr_factor(cosine, s, 1.0) for s in range(20)]
    assert values[0] == values[10] == 1.0 and values[9] < 0.05 and values[9] == pytest.approx(values[19])


def test_restart_settings_are_validated(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "adapter=lora",
            "trainer.restart.every_steps=4",
            "trainer.restart.warmup_steps=4",
            "trainer.restart.lr_schedule=wavy",
            "trainer.restart.mora_types=[1]",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "warmup_steps=4" in text and "lr_schedule=wavy" in text and "only applies to adapter=mora" in text
    # Each section alone is valid; the cycle's second type cannot serve some layer at this rank.
    run_cfg = load_run_config(
        compose_config(
            ["adapter=mora", "rank=4", "trainer.restart.every_steps=4", "trainer.restart.mora_types=[1,rope]"]
        )
    )
    model, _ = load_model_and_tokenizer(compose_run(["model=llama-tiny"]).model)
    built = build_adapter(model, run_cfg.adapter, run_cfg.rank)
    with pytest.raises(ConfigError, match=r"same r_hat.*set by `trainer.restart.mora_types`"):
        setup_training_extras(built, run_cfg.trainer, 0)


def test_restarts_on_a_quantized_base_are_refused_naming_both_keys() -> None:
    trainer = TrainerConfig(restart=RestartConfig(every_steps=4))
    (problem,) = restart_problems(trainer, "nf4")
    assert "`trainer.restart.every_steps=4`" in problem and "`model.quantization=nf4`" in problem
    assert "trainer.restart.every_steps=0 on a quantized base" in problem
    assert restart_problems(trainer, "none") == [] and restart_problems(TrainerConfig(), "int8") == []


def test_a_restart_cycle_that_does_not_start_with_mora_type_is_refused_not_replaced(tmp_path: Path) -> None:
    cfg = compose_config(
        ["adapter=mora", "rank=4", "trainer.restart.every_steps=4", "trainer.restart.mora_types=[sharing,grouping]"],
        tmp_path,
    )  # mora_type stays rope
    with pytest.raises(
        ConfigError, match=r"starts with sharing, but `adapter.mora_type=rope`.*adapter.mora_type=sharing"
    ):
        validate(cfg)
    ok = compose_config(["adapter=mora", "rank=4", "trainer.restart.every_steps=4", *REMORA_CYCLE], tmp_path)
    validate(ok)


@pytest.mark.parametrize("name", ["pretrain_lora", "pretrain_mora", "pretrain_relora", "pretrain_remora"])
def test_pretraining_experiment_configs_compose_and_validate(name: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={name}"], tmp_path)
    assert cfg.task.name == "pretrain" and cfg.rank == 128 and cfg.model.random_init.hidden_size == 768
    assert cfg.trainer.train_embeddings is True
    assert cfg.trainer.restart.every_steps == (2000 if name.endswith(("relora", "remora")) else 0)
    if name.endswith("mora"):
        assert cfg.adapter.name == "mora" and cfg.adapter.mora_type == "sharing"
    validate(cfg)


def _losses(run_dir: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h}


@needs_data
@pytest.mark.parametrize("adapter", ["mora", "lora"])
def test_pretrain_with_restarts_resumes_mid_cycle_exactly_and_exports_everything(adapter: str, tmp_path: Path) -> None:
    cycle = REMORA_CYCLE if adapter == "mora" else []
    overrides = [*PRETRAIN_RUN, f"adapter={adapter}", *cycle, "trainer.save_steps=6", "trainer.save_total_limit=null"]
    reference = tmp_path / "reference"
    metrics = run(compose_config(overrides, reference))
    assert metrics["task"] == "pretrain" and metrics["eval_perplexity"] > 1 and metrics["merge_max_abs_diff"] < 1e-4
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, 13))
    for restart_step in (4, 8):  # the function is unchanged at a restart and the lr re-warms: no jump
        assert losses[restart_step + 1] < losses[restart_step] + 0.1, losses
    mid = reference / "checkpoints" / "checkpoint-6"  # after the restart at step 4, mid second cycle
    state = json.loads((mid / "restart_state.json").read_text())
    assert state["restarts_done"] == 1
    if adapter == "mora":
        assert set(state["mora_types"].values()) == {"grouping"}
    saved = load_file(mid / "base_weights.safetensors")
    assert "embed_tokens.weight" in saved and "lm_head.weight" in saved and any("q_proj" in k for k in saved)
    # ΔW of the run is every cycle's update (merged - base), not adapter/'s last cycle alone.
    spectra, source = run_spectrum(reference)
    assert source == "merged - base (a run with restarts)" and spectra

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, resumed / "checkpoints" / "checkpoint-6")  # as if the run had been killed after step 6
    again = run(compose_config(overrides, resumed))
    assert again["run"]["resumed_from_step"] == 6
    for step in range(7, 13):
        assert _losses(resumed)[step] == pytest.approx(losses[step], abs=1e-6)
    ours, ref = (
        load_file(resumed / "merged" / "model.safetensors"),
        load_file(reference / "merged" / "model.safetensors"),
    )
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6

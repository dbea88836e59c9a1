"""The LoRA family through peft (adapter.use_rslora, use_dora, init, alpha as a multiple of the rank, LoRA+): each
member's maths against peft's own, its saved folder in plain peft, its parameter budget and its refusals.

The pipeline runs (train, resume, merge check, export) are tests/integration/test_lora_family_runs.py's.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from mora_train.adapters import build_adapter
from mora_train.adapters.base import Adapter, count_parameters
from mora_train.adapters.capabilities import factor_pair, lora_factors
from mora_train.adapters.lora.layer import PEFT_ADAPTER
from mora_train.core.errors import ConfigError, MoraTrainError
from mora_train.core.io import write_dir_atomically
from mora_train.models import load_model_and_tokenizer
from tests.conftest import compose_run, typed_config

IDS = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))


def built(*overrides: str, rank: int = 4, perturb: bool = True) -> tuple[Adapter, object]:
    """The tiny Llama with the configured adapter; with `perturb`, every trained tensor moved off its start."""
    cfg = typed_config(["model=tiny-llama", f"rank={rank}", *overrides])
    model, _ = load_model_and_tokenizer(cfg.model)
    adapter = build_adapter(model, cfg.adapter, cfg.rank)
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in adapter.trainable_parameters().values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter.model.eval()
    return adapter, cfg


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def fresh_base(cfg) -> torch.nn.Module:
    return load_model_and_tokenizer(cfg.model)[0].eval()


# -- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alpha, rslora, scaling",
    [
        ("16", False, 16 / 8),
        ("2r", False, 2.0),
        ("r", False, 1.0),
        ("0.5r", True, 4 / math.sqrt(8)),
        ("8", True, 8 / math.sqrt(8)),
    ],
)
def test_alpha_is_a_number_or_a_multiple_of_the_rank_and_rslora_divides_by_its_root(
    alpha: str, rslora: bool, scaling: float
) -> None:
    adapter, _ = built("adapter=lora", f"adapter.alpha={alpha}", f"adapter.use_rslora={str(rslora).lower()}", rank=8)
    peft_scalings = [layer.peft_layer.scaling[PEFT_ADAPTER] for layer in adapter.adapter_layers().values()]
    assert peft_scalings == pytest.approx([scaling] * len(peft_scalings))
    assert adapter.describe()["scaling"] == pytest.approx(scaling)
    assert f"scaling {scaling:.4g}" in adapter.title()


BAD = {
    "adapter.alpha=2x": "`adapter.alpha=2x` must be a positive number (16) or a positive multiple of the rank",
    "adapter.alpha=-1": "`adapter.alpha=-1` must be positive",
    "adapter.alpha=0r": "`adapter.alpha=0r` must be a positive number",
    "adapter.init=eva": "`adapter.init=eva` is not supported by mora-train: it is data-driven",
    "adapter.init=mica": "it freezes B, so it trains half of LoRA's parameters",
    "adapter.init=svd": "`adapter.init=svd` is unknown; use one of default, gaussian, orthogonal, pissa",
    "adapter.init=pissa_niter_K": "`adapter.init=pissa_niter_K` is unknown",
    "trainer.adapter_lr_ratio=0": "`trainer.adapter_lr_ratio=0` must be positive, or null",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_a_bad_family_setting_is_one_clear_problem(override: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_run(["model=tiny-llama", "adapter=lora", override])
    assert BAD[override] in str(err.value)


COMBINATIONS = {
    ("adapter=lora", "adapter.use_dora=true", "adapter.init=pissa"): "which has no place for DoRA's magnitude",
    ("adapter=lora", "adapter.init=orthogonal", "rank=5"): "`adapter.init=orthogonal` needs an even rank",
    ("adapter=pissa", "trainer.restart.every_steps=4"): "`adapter.init=pissa` with `trainer.restart.every_steps=4`",
    ("adapter=olora", "model.quantization=nf4"): "`adapter=lora` with `model.quantization=nf4`: adapter.init=olora",
    ("adapter=pissa", "model.quantization=int8"): "would be re-quantized (peft refuses PiSSA there)",
    ("adapter=mora", "trainer.adapter_lr_ratio=16"): "adapter=mora trains no such pair of factors",
    ("adapter=full", "trainer.adapter_lr_ratio=16"): "adapter=full trains no such pair of factors",
    ("adapter=lora", "trainer.adapter_lr_ratio=16", "distributed=zero3_offload"): "builds its own optimizer",
}


@pytest.mark.parametrize("overrides", sorted(COMBINATIONS), ids="|".join)
def test_combinations_the_family_cannot_run_are_refused_before_a_model_loads(overrides: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        compose_run(["model=tiny-llama", *overrides])
    assert COMBINATIONS[overrides] in str(err.value)


def test_dora_on_an_int8_base_is_refused_without_a_gpu_and_residual_inits_when_built() -> None:
    pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available():
        pytest.skip("the int8 refusal applies without a GPU only")
    with pytest.raises(ConfigError, match="DoRA on an 8-bit base without a GPU"):
        compose_run(["model=tiny-llama", "adapter=dora", "model.quantization=int8"])
    compose_run(["model=tiny-llama", "adapter=dora", "model.quantization=nf4"])  # 4-bit: runs (test_quantization)
    cfg = typed_config(["model=tiny-llama", "adapter=pissa", "rank=4"])
    quantized = load_model_and_tokenizer(typed_config(["model=tiny-llama", "model.quantization=nf4"]).model)[0]
    with pytest.raises(MoraTrainError, match=re.escape("adapter.init=pissa replaces each base weight")):
        build_adapter(quantized, cfg.adapter, cfg.rank)


def test_residual_inits_refuse_layers_narrower_than_the_rank() -> None:
    from mora_train.training.preflight import PlannedRun, check_model_fit

    cfg = typed_config(["model=tiny-llama", "adapter=pissa", "rank=48"])  # k_proj / v_proj are 32 x 64
    model, _ = load_model_and_tokenizer(cfg.model)
    planned = PlannedRun(cfg.model, cfg.trainer, cfg.adapter, cfg.rank, Path("unused"), None)
    with pytest.raises(ConfigError, match=re.escape("`adapter.init=pissa` takes 48 directions of each W")):
        check_model_fit(model, planned)


# -- the budget -------------------------------------------------------------------------------------------


def test_trainable_parameters_are_mora_s_across_the_family_and_dora_adds_its_magnitudes() -> None:
    counts = {}
    for member in ("lora", "rslora", "pissa", "olora", "dora", "mora", "mora_sharing"):
        adapter, cfg = built(f"adapter={member}", perturb=False)
        trainable = count_parameters(adapter.model)[0]
        layers = {name: layer.frozen_linear() for name, layer in adapter.adapter_layers().items()}
        # What the preflight disk estimate uses, computed without building the adapter, agrees.
        assert type(adapter).trainable_count(adapter.base_model, layers, cfg.adapter, cfg.rank) == trainable, member
        counts[member] = trainable
        rows = adapter.module_summaries()
        assert sum(r.trainable for r in rows) == trainable
        if member == "dora":
            assert {r.size for r in rows} == {"r=4+m"} and "d_out magnitudes" in adapter.title()
            magnitudes = sum(r.d_out for r in rows)
    assert len({counts[m] for m in ("lora", "rslora", "pissa", "olora")}) == 1, counts
    assert counts["dora"] == counts["lora"] + magnitudes
    # MoRA's square side r̂ = round(sqrt((d_in + d_out) r)) (even for rope) matches LoRA's count to its rounding.
    for member in ("mora", "mora_sharing"):
        assert abs(counts[member] - counts["lora"]) <= 0.05 * counts["lora"], counts


# -- DoRA -------------------------------------------------------------------------------------------------


def test_dora_delta_weight_is_peft_s_merge_minus_w_and_has_no_factors_of_its_own() -> None:
    adapter, _ = built("adapter=dora")
    for name, layer in adapter.adapter_layers().items():
        W = layer.frozen_linear().weight.detach().clone()
        peft_copy = copy.deepcopy(layer.peft_layer)
        peft_copy.merge(safe_merge=True, adapter_names=[PEFT_ADAPTER])  # peft's own DoRA merge
        merged_by_peft = peft_copy.get_base_layer().weight.detach()
        delta = layer.delta_weight()
        torch.testing.assert_close(W + delta, merged_by_peft, rtol=0, atol=2e-6)
        assert layer.lora_factors() is None, name
        # Not a rank-r update: (m / ||W + s B A|| - 1) W is as wide as W.
        assert torch.linalg.matrix_rank(delta) > 4
    # The LoRA export's factors: the SVD of ΔW at its numerical rank, exact.
    deltas = adapter.delta_weights()
    for name, (B, A) in lora_factors(adapter).items():
        torch.testing.assert_close(B @ A, deltas[name], rtol=0, atol=1e-5)


def test_a_dora_restart_folds_w_prime_and_starts_again_from_the_same_function() -> None:
    adapter, _ = built("adapter=dora")
    before = logits(adapter.model)
    adapter.fold_and_reset(torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    for layer in adapter.adapter_layers().values():
        assert layer.delta_weight().abs().max() < 1e-5  # B = 0 and m = ||W'||: ΔW = 0 again
    torch.testing.assert_close(logits(adapter.model), before, rtol=0, atol=1e-4)


# -- PiSSA / OLoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["pissa", "olora"])
def test_a_residual_init_starts_at_the_base_model_and_is_saved_as_peft_s_own_conversion(
    member: str, tmp_path: Path
) -> None:
    adapter, cfg = built(f"adapter={member}", perturb=False)
    base = fresh_base(cfg)
    torch.testing.assert_close(logits(adapter.model), logits(base), rtol=0, atol=1e-5)  # W_res + s B0 A0 = W
    # peft's own way: the initial adapter saved before training, converted at the save.
    adapter.peft_model.save_pretrained(str(tmp_path / "initial"))
    with torch.no_grad():
        for param in adapter.trainable_parameters().values():
            param.add_(torch.randn_like(param) * 0.05)
    trained = logits(adapter.model)
    write_dir_atomically(tmp_path / "ours", adapter.save)
    adapter.peft_model.save_pretrained(
        str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    ours, peft_own = (
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_own.keys() and all(torch.equal(ours[k], peft_own[k]) for k in ours)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 8, True)
    assert (theirs["r"], theirs["lora_alpha"], theirs["init_lora_weights"]) == (8, 8, True)
    # Plain peft on the ORIGINAL base computes what was trained on the residual one.
    reloaded = PeftModel.from_pretrained(fresh_base(cfg), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(reloaded), trained, rtol=0, atol=1e-5)


@pytest.fixture
def pissa_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor, object]:
    adapter, cfg = built("adapter=pissa")
    write_dir_atomically(tmp_path / "checkpoint", adapter.save)
    trained = {k: p.detach().clone() for k, p in adapter.trainable_parameters().items()}
    return tmp_path / "checkpoint", trained, logits(adapter.model), cfg


def test_a_residual_init_resumes_from_its_converted_checkpoint(pissa_checkpoint) -> None:
    folder, trained, expected, _ = pissa_checkpoint
    resumed, _ = built("adapter=pissa", perturb=False)  # rebuilt as a resume rebuilds it: W_res again
    resumed.load_weights(folder)
    live = resumed.trainable_parameters()
    assert live.keys() == trained.keys() and all(torch.equal(live[k], trained[k]) for k in live)
    torch.testing.assert_close(logits(resumed.model), expected, rtol=0, atol=1e-6)


def test_a_checkpoint_of_another_initialisation_is_refused(pissa_checkpoint, tmp_path: Path) -> None:
    folder, _, _, _ = pissa_checkpoint
    state = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in state if "lora_A" in k)
    state[key][4:] += 0.5  # its B0 A0 part: not what this base's SVD gives
    save_file(state, folder / "adapter_model.safetensors")
    resumed, _ = built("adapter=pissa", perturb=False)
    with pytest.raises(MoraTrainError, match="was not written from this run's initialisation"):
        resumed.load_weights(folder)
    for member in ("dora", "lora"):  # another family member's checkpoint: DoRA's m, a plain LoRA's rank
        other, _ = built(f"adapter={member}", perturb=False)
        with pytest.raises(MoraTrainError, match=re.escape("was saved with {'r': 8, 'use_dora': False")):
            other.load_weights(folder)


# -- LoRA+ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["lora", "dora"])
def test_lora_plus_gives_b_ratio_times_a_s_learning_rate(member: str) -> None:
    adapter, _ = built(f"adapter={member}", perturb=False)
    optimizer = factor_pair(adapter).factor_pair_optimizer(torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.0}, 16)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = adapter.trainable_parameters()
    assert set(rate) == {id(p) for p in trainable.values()}
    for name, param in trainable.items():
        # B and DoRA's magnitudes (peft's LoRA+ puts every trained 1-D tensor with B) at 16 x, A at 1 x.
        faster = "lora_B" in name or "magnitude" in name
        assert rate[id(param)] == pytest.approx(1.6e-2 if faster else 1e-3), name


def test_lora_plus_is_refused_for_a_method_without_factors() -> None:
    adapter, _ = built("adapter=mora", perturb=False)
    with pytest.raises(MoraTrainError, match="adapter=mora trains no pair of factors"):
        factor_pair(adapter)

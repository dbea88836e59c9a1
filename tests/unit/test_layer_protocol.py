"""The layer protocol (adapters/layer.py): each method's layers merge, unmerge and fold the same way, and the
model-level operations are written once over them instead of once per method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mora_train.adapters import ADAPTER_TYPES, build_adapter
from mora_train.adapters.base import Adapter
from mora_train.adapters.capabilities import lora_factors
from mora_train.adapters.layer import AdapterLayer
from mora_train.core.errors import MoraTrainError
from mora_train.models import load_model_and_tokenizer
from tests.conftest import typed_config

# Written once in adapters/base.py or adapters/capabilities.py over the layers; a method that defines one of
# these again has gone back to a per-method loop.
WRITTEN_ONCE = (
    "merge_and_unload",
    "lora_factors",
    "fold_and_reset",
    "restart_parameters",
    "adapted_base_weights",
    "load_state",
)


def _built(adapter: str, *overrides: str) -> Adapter:
    cfg = typed_config(["model=tiny-llama", f"adapter={adapter}", "rank=4", *overrides])
    model, _ = load_model_and_tokenizer(cfg.model)
    built = build_adapter(model, cfg.adapter, cfg.rank, load_base=lambda: load_model_and_tokenizer(cfg.model)[0])
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero update everywhere (LoRA's B and MoRA's M start at zero)
        for p in built.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.02)
    built.model.eval()
    return built


def test_no_built_in_method_writes_a_model_level_loop_again() -> None:
    redefined = {cls.name: sorted(set(WRITTEN_ONCE) & set(vars(cls))) for cls in ADAPTER_TYPES.values()}
    assert all(not ops for ops in redefined.values()), redefined


METHODS = [
    ("lora",),
    ("mora", "adapter.mora_type=sharing"),
    ("mora", "adapter.mora_type=rope"),
    ("lora", "adapter.use_dora=true"),  # ΔW = W' - W of peft's DoRA merge, which depends on W
    ("lora", "adapter.init=pissa"),  # on the residual W - s B0 A0
]


@pytest.mark.parametrize("method", METHODS, ids="-".join)
def test_each_layer_merges_its_delta_weight_keeping_the_function_and_unmerges_it(method: tuple[str, ...]) -> None:
    built = _built(*method)
    layers = built.adapter_layers()
    assert layers and all(isinstance(layer, AdapterLayer) for layer in layers.values())
    ids = torch.randint(3, 200, (2, 8))
    with torch.no_grad():
        expected = built.model(input_ids=ids).logits
    for name, layer in layers.items():
        weight = layer.frozen_linear().weight
        before, delta = weight.detach().clone(), layer.delta_weight()
        assert delta.abs().max() > 0, name
        layer.merge()
        layer.merge()  # a second merge does nothing
        assert layer.merged
        torch.testing.assert_close(weight.detach(), before + delta, rtol=0, atol=1e-6)
    with torch.no_grad():  # every layer merged: the forward leaves the update out, the function is the same
        torch.testing.assert_close(built.model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    for layer in layers.values():
        layer.unmerge()
        assert not layer.merged
    with torch.no_grad():
        torch.testing.assert_close(built.model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS[:2], ids="-".join)
def test_a_merged_layer_refuses_to_fold(method: tuple[str, ...]) -> None:
    layer = next(iter(_built(*method).adapter_layers().values()))
    layer.merge()
    with pytest.raises(RuntimeError, match="fold on a merged layer"):
        layer.fold()  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", METHODS[:2], ids="-".join)
def test_a_non_finite_update_is_refused_by_the_merge_naming_the_layer(method: tuple[str, ...]) -> None:
    built = _built(*method)
    name, layer = next(iter(built.adapter_layers().items()))
    weight = layer.frozen_linear().weight
    before = weight.detach().clone()
    with torch.no_grad():
        next(iter(layer.adapter_params().values())).fill_(float("nan"))
    with pytest.raises(MoraTrainError, match=name.replace(".", r"\.")):
        built.merge_and_unload()
    assert torch.equal(weight.detach(), before)  # refused before anything was written


def test_the_default_merge_adds_in_float32_and_rounds_once() -> None:
    class Scaled(AdapterLayer):
        """ΔW = s (a fixed matrix): a layer that uses every default of the protocol."""

        def __init__(self, linear: nn.Linear, delta: torch.Tensor) -> None:
            self.layer_name, self.linear, self.delta = "probe", linear, delta

        def frozen_linear(self) -> nn.Linear:
            return self.linear

        def delta_weight(self) -> torch.Tensor:
            return self.delta

        def adapter_params(self) -> dict[str, nn.Parameter]:
            return {}

        def size_label(self) -> str:
            return "probe"

    linear = nn.Linear(64, 32).to(torch.bfloat16)
    start = linear.weight.detach().clone()
    delta = torch.randn(32, 64) * 1e-3  # mostly below bf16's spacing near the weights: adding in bf16 loses it
    layer = Scaled(linear, delta)
    layer.merge()
    assert torch.equal(linear.weight.detach(), (start.float() + delta).bfloat16())
    with pytest.raises(ValueError, match=r"layer 'probe'.*not finite"):
        Scaled(nn.Linear(4, 4), torch.full((4, 4), float("inf"))).merge()


def test_full_fine_tuning_layers_are_merged_from_the_start() -> None:
    built = _built("full", "adapter.target_modules=[q_proj]")
    layer = next(iter(built.adapter_layers().values()))
    assert layer.merged and layer.size_label() == "full"
    with pytest.raises(MoraTrainError, match="no separate update"):
        layer.unmerge()
    assert built.merge_and_unload() is built.base_model
    with pytest.raises(MoraTrainError, match="adapter=full has no low-rank form"):
        lora_factors(built)

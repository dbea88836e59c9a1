"""Hypothesis properties of MoRALinear over random shapes, ranks and every operator type."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mora_train.adapters.mora.layer import MORA_TYPES, MoRALinear, mora_shape_problem, mora_square_side

LAYER = "model.layers.3.self_attn.v_proj"

dims = st.integers(min_value=1, max_value=200)
ranks = st.integers(min_value=1, max_value=64)
kinds = st.sampled_from(list(MORA_TYPES))
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _build(d_in: int, d_out: int, rank: int, kind: str, seed: int) -> MoRALinear | None:
    """The layer with a perturbed M, or None after checking the refusal names the layer."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=torch.float64)
    problem = mora_shape_problem(LAYER, d_in, d_out, rank, kind)
    if problem is not None:
        with pytest.raises(ValueError, match=re.escape(LAYER)) as err:
            MoRALinear(base, rank, kind, layer_name=LAYER)
        assert LAYER in str(err.value) and f"{d_out} x {d_in}" in str(err.value)
        return None
    layer = MoRALinear(base, rank, kind, layer_name=LAYER)
    assert layer.r_hat == mora_square_side(d_in, d_out, rank, kind)
    return layer


@FAST
@given(d_in=dims, d_out=dims, rank=ranks, kind=kinds, seed=st.integers(0, 2**16))
def test_forward_equals_delta_weight(d_in: int, d_out: int, rank: int, kind: str, seed: int) -> None:
    layer = _build(d_in, d_out, rank, kind, seed)
    if layer is None:
        return
    x = torch.randn(3, d_in, dtype=torch.float64)
    frozen = layer.base_layer(x)
    assert torch.equal(layer(x), frozen)  # zero init: exactly the frozen layer
    with torch.no_grad():
        layer.mora_M.normal_()
    delta = layer.delta_weight()
    assert delta.shape == (d_out, d_in)
    torch.testing.assert_close(layer(x) - frozen, x @ delta.T, rtol=1e-10, atol=1e-10)


@FAST
@given(d_in=dims, d_out=dims, rank=ranks, kind=kinds, seed=st.integers(0, 2**16))
def test_only_M_gets_gradients_and_they_match_delta(d_in: int, d_out: int, rank: int, kind: str, seed: int) -> None:
    layer = _build(d_in, d_out, rank, kind, seed)
    if layer is None:
        return
    with torch.no_grad():
        layer.mora_M.normal_()
    x = torch.randn(2, d_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, d_out, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["mora_M"]
    # d loss / d x through the frozen layer plus delta_W (delta_W is linear in M, so the
    # input gradient pins down the adapter's backward exactly).
    w = layer.base_layer.weight + layer.delta_weight()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-9, atol=1e-9)
    grad_M = layer.mora_M.grad
    assert grad_M is not None and grad_M.shape == (layer.r_hat, layer.r_hat)
    # delta_W is linear in M, so <grad_M, D> must equal the loss change of delta_W(D) for any D.
    direction = torch.randn_like(grad_M)
    with torch.no_grad():
        layer.mora_M.copy_(direction)
    expected = (g * (x.detach() @ layer.delta_weight().T)).sum()
    torch.testing.assert_close((grad_M * direction).sum(), expected, rtol=1e-9, atol=1e-9)


@FAST
@given(d_in=dims, d_out=dims, rank=ranks, kind=kinds, seed=st.integers(0, 2**16))
def test_merge_unmerge_round_trip(d_in: int, d_out: int, rank: int, kind: str, seed: int) -> None:
    layer = _build(d_in, d_out, rank, kind, seed)
    if layer is None:
        return
    with torch.no_grad():
        layer.mora_M.normal_()
    x = torch.randn(2, d_in, dtype=torch.float64)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)


@settings(max_examples=200, deadline=None)
@given(d_in=dims, d_out=dims, rank=ranks, kind=kinds)
def test_refusals_only_where_documented(d_in: int, d_out: int, rank: int, kind: str) -> None:
    problem = mora_shape_problem(LAYER, d_in, d_out, rank, kind)
    side = mora_square_side(d_in, d_out, rank, kind)
    if kind == "truncation":
        assert (problem is None) == (side <= min(d_in, d_out))
    elif kind == "rope":
        assert (problem is None) == (side >= 2)
    else:
        assert problem is None
    if problem is not None:
        assert LAYER in problem and f"{d_out} x {d_in}" in problem and f"r_hat = {side}" in problem

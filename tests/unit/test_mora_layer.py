"""Unit tests for the MoRA layer against a naive, loop-based reading of the operator table (docs/adapters.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from mora_train.adapters.mora.layer import (
    MORA_TYPE_DESCRIPTIONS,
    MORA_TYPES,
    MoRALinear,
    mora_shape_problem,
    mora_square_side,
    resolve_mora_type,
)

ALL_TYPES = list(MORA_TYPES)

# (d_in, d_out, rank): multiples and non-multiples of r_hat, GQA k/v, r_hat >= d_in, r_hat > 2 d_in.
SHAPES = [
    (64, 64, 8),
    (64, 64, 32),
    (576, 192, 8),
    (576, 1536, 8),
    (1536, 576, 8),
    (100, 37, 4),
    (37, 100, 4),
    (8, 8, 16),
    (32, 64, 4),
    (64, 32, 1),
    (16, 16, 1),
    (3, 5, 2),
]


# ---------------------------------------------------------------------------------------------
# Naive reference: one token at a time, written straight from the operator table.
# ---------------------------------------------------------------------------------------------
def _groups(total: int, r: int) -> list[list[int]]:
    """r contiguous groups over `total` items, the first total mod r groups one longer."""
    s, a = divmod(total, r)
    out, start = [], 0
    for g in range(r):
        size = s + 1 if g < a else s
        out.append(list(range(start, start + size)))
        start += size
    return out


def _rope_rotate(chunk: torch.Tensor, b: int) -> torch.Tensor:
    r = chunk.shape[0]
    h = r // 2
    out = chunk.clone()
    for k in range(h):
        theta = b * 10000.0 ** (-2.0 * k / r)
        c, s = math.cos(theta), math.sin(theta)
        # rotate-half convention: y = x cos + rotate_half(x) sin, rotate_half(x) = cat(-x[h:], x[:h])
        out[k] = chunk[k] * c - chunk[k + h] * s
        out[k + h] = chunk[k + h] * c + chunk[k] * s
    return out


def reference_delta(x: torch.Tensor, M: torch.Tensor, d_out: int, kind: str) -> torch.Tensor:
    """delta(x) for a single token x of shape (d_in,)."""
    d_in, r = x.shape[0], M.shape[0]
    n_chunks = -(-d_in // r)
    padded = torch.stack([x[j % d_in] for j in range(n_chunks * r)])  # cyclic wrap-around padding
    if kind in ("sharing", "share_group"):
        z = padded.view(n_chunks, r).sum(0)
    elif kind in ("grouping", "group_tile"):
        z = torch.stack([x[g].sum() if g else x.new_zeros(()) for g in _groups(d_in, r)])
    elif kind == "truncation":
        z = x[:r]
    if kind in ("rope", "decouple"):
        outs = []
        for b in range(n_chunks):
            chunk = padded[b * r : (b + 1) * r]
            if kind == "rope":
                chunk = _rope_rotate(chunk, b)
            outs.append(M @ chunk)
        o = torch.cat(outs)
        return torch.stack([o[i % o.shape[0]] for i in range(d_out)])
    o = M @ z
    if kind in ("sharing", "group_tile"):
        return torch.stack([o[i % r] for i in range(d_out)])
    if kind in ("grouping", "share_group"):
        res = x.new_zeros(d_out)
        for g, rows in enumerate(_groups(d_out, r)):
            for i in rows:
                res[i] = o[g]
        return res
    res = x.new_zeros(d_out)
    res[:r] = o
    return res


def make_layer(d_in: int, d_out: int, rank: int, kind: str, dtype=torch.float64, seed: int = 0, **kw) -> MoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    layer = MoRALinear(base, rank, kind, layer_name="blk.proj", **kw)
    with torch.no_grad():
        layer.mora_M.normal_()  # perturb the zero init, otherwise every equivalence is trivial
    return layer


def _works(d_in: int, d_out: int, rank: int, kind: str) -> bool:
    return mora_shape_problem("x", d_in, d_out, rank, kind) is None


CASES = [(s, k) for s in SHAPES for k in ALL_TYPES if _works(*s, k)]


# ---------------------------------------------------------------------------------------------
# Names, r_hat, refusals
# ---------------------------------------------------------------------------------------------
def test_type_tables_and_resolution() -> None:
    assert MORA_TYPES == {
        "sharing": 1,
        "grouping": 2,
        "group_tile": 3,
        "share_group": 4,
        "rope": 6,
        "decouple": None,
        "truncation": None,
    }
    assert set(MORA_TYPE_DESCRIPTIONS) == set(MORA_TYPES)
    for name, number in MORA_TYPES.items():
        assert resolve_mora_type(name) == name
        assert resolve_mora_type(name.upper()) == name
        if number is not None:
            assert resolve_mora_type(number) == name
            assert resolve_mora_type(str(number)) == name
    for bad in (5, "5", 0, 7, "lora", True, 1.0, ""):
        with pytest.raises(ValueError, match="Unknown MoRA type") as err:
            resolve_mora_type(bad)  # type: ignore[arg-type]
        assert repr(bad) in str(err.value) and "sharing" in str(err.value) and "6" in str(err.value)


def test_square_side_matches_formula() -> None:
    assert mora_square_side(4096, 4096, 8, "sharing") == 256
    assert mora_square_side(4096, 11008, 8, 1) == 348
    assert mora_square_side(576, 1536, 256, "sharing") == 735
    assert mora_square_side(576, 1536, 256, "rope") == 734  # rounded down to even
    assert mora_square_side(100, 37, 4, "6") == 22  # sqrt(548) + 0.5 = 23.9 -> 23 -> 22
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"MoRA rank must be a positive integer, got {bad}"):
            mora_square_side(8, 8, bad, "sharing")


def test_refusals_are_rare_and_explained() -> None:
    # Every type but truncation works for r_hat >= d_in and r_hat > 2 d_in.
    for kind in ALL_TYPES:
        if kind != "truncation":
            assert mora_shape_problem("a", 8, 8, 64, kind) is None
            assert mora_shape_problem("a", 1, 200, 64, kind) is None
    msg = mora_shape_problem("model.layers.0.mlp.up_proj", 64, 64, 64, "truncation")
    assert msg is not None
    assert "model.layers.0.mlp.up_proj" in msg and "64 x 64" in msg and "r_hat = 91" in msg
    assert "largest usable rank for this layer and type is 32" in msg
    assert mora_shape_problem("a", 64, 64, 32, "truncation") is None  # r_hat == 64 fits exactly
    msg = mora_shape_problem("tiny", 1, 200, 1, "truncation")
    assert msg is not None and "No rank works" in msg
    msg = mora_shape_problem("one", 1, 1, 1, "rope")
    assert msg is not None and "one" in msg and "r_hat >= 2" in msg and "rank 2" in msg
    assert mora_shape_problem("one", 1, 1, 2, "rope") is None
    assert "positive" in (mora_shape_problem("z", 4, 4, 0, "sharing") or "")
    with pytest.raises(ValueError, match=re.escape("blk.proj")):
        MoRALinear(nn.Linear(64, 64), 64, "truncation", layer_name="blk.proj")


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{s[0]}x{s[1]}r{s[2]}-{k}" for s, k in CASES])
def test_forward_matches_reference_and_delta_weight(shape: tuple[int, int, int], kind: str) -> None:
    d_in, d_out, rank = shape
    layer = make_layer(d_in, d_out, rank, kind)
    x = torch.randn(3, d_in, dtype=torch.float64)
    got = layer(x) - layer.base_layer(x)
    delta_w = layer.delta_weight()
    assert delta_w.shape == (d_out, d_in) and delta_w.dtype == torch.float64
    torch.testing.assert_close(got, x @ delta_w.T, rtol=1e-10, atol=1e-10)
    if d_in * d_out <= 100 * 100:  # the loop reference is slow on the big shapes
        ref = torch.stack([reference_delta(row, layer.mora_M.detach(), d_out, kind) for row in x])
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_sharing_hand_example() -> None:
    # d_in = 5, r_hat = 3: padded x = [x0 x1 x2 | x3 x4 x0] -> z = [x0+x3, x1+x4, x2+x0]
    layer = MoRALinear(nn.Linear(5, 4, bias=False, dtype=torch.float64), 1, "sharing")
    assert layer.r_hat == 3
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.mora_M.copy_(torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]], dtype=torch.float64)
    z = torch.tensor([1 + 8, 2 + 16, 4 + 1], dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], torch.cat([z, z[:1]]))


def test_rope_first_chunk_unrotated_and_decouple_is_rope_without_rotation() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 64, dtype=torch.float64)
    rope = make_layer(64, 64, 8, "rope")
    dec = make_layer(64, 64, 8, "decouple")
    assert rope.r_hat == dec.r_hat == 32
    with torch.no_grad():
        dec.mora_M.copy_(rope.mora_M)
        dec.base_layer.load_state_dict(rope.base_layer.state_dict())
    a, b = rope(x), dec(x)
    torch.testing.assert_close(a[:, :32], b[:, :32])  # chunk 0 has angle 0
    assert not torch.allclose(a[:, 32:], b[:, 32:])


# ---------------------------------------------------------------------------------------------
# Init, gradients, merge
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_TYPES)
def test_zero_init_and_only_M_trains(kind: str) -> None:
    base = nn.Linear(37, 100)
    expected_weight = base.weight.detach().clone()
    layer = MoRALinear(base, 2, kind, layer_name="l")
    assert torch.count_nonzero(layer.mora_M) == 0
    x = torch.randn(2, 5, 37, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 5, 100)
    assert torch.equal(out, base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["mora_M"]
    assert layer.adapter_params() == {"mora_M": layer.mora_M}
    (out**2).sum().backward()
    assert layer.mora_M.grad is not None and torch.count_nonzero(layer.mora_M.grad) > 0
    assert base.weight.grad is None and base.bias.grad is None
    assert torch.equal(base.weight, expected_weight)


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_gradients_match_dense_delta(kind: str) -> None:
    layer = make_layer(100, 37, 4, kind)
    x = torch.randn(4, 100, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 37, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    gx, gM = x.grad.clone(), layer.mora_M.grad.clone()
    # Same loss through the autograd of a loop-free dense construction of delta_W.
    x2 = x.detach().clone().requires_grad_(True)
    M = layer.mora_M.detach().clone().requires_grad_(True)
    eye = torch.eye(100, dtype=torch.float64)
    dense = torch.stack([reference_delta(col, M, 37, kind) for col in eye], dim=1)
    ((layer.base_layer(x2) + x2 @ dense.T) * g).sum().backward()
    torch.testing.assert_close(gx, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gM, M.grad, rtol=1e-10, atol=1e-10)


def _forward_with_M(layer: MoRALinear, M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run the layer with M swapped for a plain tensor, so gradcheck can treat M as an input."""
    old = layer._parameters["mora_M"]
    try:
        layer._parameters["mora_M"] = M  # type: ignore[assignment]
        return layer(x)
    finally:
        layer._parameters["mora_M"] = old


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_gradcheck(kind: str) -> None:
    layer = make_layer(11, 7, 3, kind)
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    M = layer.mora_M.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp, m: _forward_with_M(layer, m, inp), (x, M))


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_merge_unmerge_round_trip(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    layer = MoRALinear(base, 4, kind)
    with torch.no_grad():
        layer.mora_M.normal_(std=0.1)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 64)
    before = layer(x)
    layer.merge()
    assert layer.merged
    layer.merge()  # idempotent
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.unmerge()  # idempotent
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite() -> None:
    layer = make_layer(16, 16, 2, "sharing", dtype=torch.float32)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.mora_M[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sharing", "rope", "grouping"])
def test_low_precision(dtype: torch.dtype, kind: str) -> None:
    layer = make_layer(96, 64, 4, kind, dtype=torch.float32)
    layer.to(dtype)
    assert layer.mora_M.dtype == dtype
    x = torch.randn(4, 96, dtype=dtype, requires_grad=True)
    try:
        out = layer(x)
        out.float().sum().backward()
    except RuntimeError as exc:  # some CPU builds lack fp16 kernels
        if dtype is torch.float16:
            pytest.skip(f"fp16 not supported on this CPU build: {exc}")
        raise
    assert out.dtype == dtype and x.grad.dtype == dtype and layer.mora_M.grad.dtype == dtype
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    ref = layer.base_layer(x).float() + x.float() @ delta.T
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-1)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight.float(), w0.float(), rtol=2e-2, atol=2e-2)


def test_state_dict_holds_only_weights_and_M() -> None:
    for kind in ALL_TYPES:
        if not _works(40, 24, 2, kind):
            continue
        layer = make_layer(40, 24, 2, kind, dtype=torch.float32)
        layer(torch.randn(2, 40))  # populate the derived-table caches
        layer.delta_weight()
        assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "mora_M"}
        assert list(layer.buffers()) == []
    nobias = MoRALinear(nn.Linear(8, 8, bias=False), 1, "rope")
    assert set(nobias.state_dict()) == {"base_layer.weight", "mora_M"}


def test_tables_follow_dtype_and_proxies() -> None:
    layer = make_layer(48, 48, 2, "rope", dtype=torch.float32)
    x = torch.randn(3, 48)
    y32 = layer(x)
    layer.double()
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    text = repr(layer)
    for part in ("d_in=48", "d_out=48", "rank=2", f"r_hat={layer.r_hat}", "type=rope"):
        assert part in text


def test_dropout_applies_to_adapter_input_only() -> None:
    layer = make_layer(32, 32, 2, "sharing", dtype=torch.float32, dropout=0.5)
    x = torch.randn(4, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, layer.base_layer(x) + dropped @ layer.delta_weight().T)


def test_autocast_bf16_runs() -> None:
    layer = make_layer(64, 32, 2, "rope", dtype=torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert layer.mora_M.grad is not None and layer.mora_M.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_adapter_trains_when_input_needs_no_grad(kind: str) -> None:
    layer = make_layer(48, 20, 2, kind, dtype=torch.float32)
    x = torch.randn(6, 48)  # e.g. the first layer after a frozen embedding
    g = torch.randn(6, 20)
    (layer(x) * g).sum().backward()
    grad_M = layer.mora_M.grad
    assert grad_M is not None
    # linear in M: <grad_M, D> equals the loss change of delta_W(D)
    direction = torch.randn_like(grad_M)
    with torch.no_grad():
        layer.mora_M.copy_(direction)
    expected = (g * (x @ layer.delta_weight().T)).sum()
    torch.testing.assert_close((grad_M * direction).sum(), expected, rtol=1e-4, atol=1e-4)


def test_set_type_keeps_M_and_switches_the_operators() -> None:
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(100, 37, bias=False), rank=4, mora_type="sharing", layer_name="proj")
    with torch.no_grad():
        layer.mora_M.normal_()
    M = layer.mora_M.detach().clone()
    before = layer.delta_weight()
    layer.set_type(2)  # grouping, by its official number: same r_hat as sharing
    assert layer.mora_type == "grouping" and torch.equal(layer.mora_M, M)
    after = layer.delta_weight()
    assert not torch.allclose(before, after)  # different operators, same M
    x = torch.randn(5, 100)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ after.T, rtol=1e-5, atol=1e-5)


def test_set_type_refuses_other_r_hat_and_merged_layers() -> None:
    # (64, 64, 1): sqrt(128) = 11.3 -> r_hat 11 for sharing, rounded down to even (10) for rope.
    layer = MoRALinear(nn.Linear(64, 64, bias=False), rank=1, mora_type="sharing", layer_name="q")
    with pytest.raises(ValueError, match=r"Layer 'q'.*'rope' has r_hat = 10.*r_hat = 11"):
        layer.set_type("rope")
    assert layer.mora_type == "sharing"
    layer.merge()
    with pytest.raises(ValueError, match="unmerge before switching"):
        layer.set_type("grouping")
    layer.unmerge()
    layer.set_type("grouping")
    assert layer.mora_type == "grouping"


@pytest.mark.parametrize("kind", ["sharing", "rope"])
def test_delta_weight_into_a_buffer(kind: str) -> None:
    layer = MoRALinear(nn.Linear(100, 37, bias=False), rank=4, mora_type=kind, layer_name="proj")
    with torch.no_grad():
        layer.mora_M.normal_()
    buffer = torch.full((37, 100), float("nan"))
    assert layer.delta_weight(out=buffer) is buffer
    torch.testing.assert_close(buffer, layer.delta_weight(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'proj': out must be a 37 x 100 torch.float32 tensor"):
        layer.delta_weight(out=torch.empty(100, 37))

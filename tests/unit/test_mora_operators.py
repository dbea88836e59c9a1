"""Each MoRA operator class against its adjoint: <C x, g> = <x, C^T g> in float64 over random shapes.

The backward and delta_W are built from the adjoints, so an adjoint that drifted from its forward would
make training and merging disagree with the forward; these pin every pair down on its own.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mora_train.adapters.mora.branch import ChunkedBranch, SquareBranch, build_branch
from mora_train.adapters.mora.layer import MORA_OPERATORS
from mora_train.adapters.mora.operators import (
    Compression,
    Concatenate,
    Decompression,
    GroupSum,
    Repeat,
    RopeChunks,
    RowMode,
    Tile,
    Truncate,
    WrapChunks,
    WrapSum,
    ZeroPad,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes = st.integers(min_value=1, max_value=60)
tokens = st.integers(min_value=1, max_value=3)
seeds = st.integers(0, 2**16)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.shape == b.shape
    return (a * b).sum()


def check_compression(op: Compression, T: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, op.d_in, dtype=torch.float64, generator=gen)
    cx = op.apply(x)
    g = torch.randn(cx.shape, dtype=torch.float64, generator=gen)
    ctg = op.adjoint(g)
    assert ctg.shape == (T, op.d_in)
    torch.testing.assert_close(inner(cx, g), inner(x, ctg), rtol=1e-12, atol=1e-12)


def decompress(op: Decompression, y: torch.Tensor) -> torch.Tensor:
    out = y.new_zeros(y.shape[0], op.d_out)
    op.add_into(out, y)
    return out


def check_decompression(op: Decompression, in_shape: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(in_shape, dtype=torch.float64, generator=gen)
    dy = decompress(op, y)
    g = torch.randn(dy.shape, dtype=torch.float64, generator=gen)
    dtg = op.adjoint(g)
    assert dtg.shape == in_shape
    torch.testing.assert_close(inner(dy, g), inner(y, dtg), rtol=1e-12, atol=1e-12)


@FAST
@given(d_in=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_wrap_sum_adjoint(d_in: int, r_hat: int, T: int, seed: int) -> None:
    check_compression(WrapSum(d_in, r_hat), T, seed)


@FAST
@given(d_in=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_group_sum_adjoint(d_in: int, r_hat: int, T: int, seed: int) -> None:
    check_compression(GroupSum(d_in, r_hat), T, seed)


@FAST
@given(d_in=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_truncate_adjoint(d_in: int, r_hat: int, T: int, seed: int) -> None:
    check_compression(Truncate(max(d_in, r_hat), min(d_in, r_hat)), T, seed)  # keeps r_hat <= d_in features


@FAST
@given(d_in=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_wrap_chunks_adjoint(d_in: int, r_hat: int, T: int, seed: int) -> None:
    op = WrapChunks(d_in, r_hat)
    check_compression(op, T, seed)
    assert op.apply(torch.zeros(T, d_in)).shape == (T, op.n_chunks, r_hat)


@FAST
@given(d_in=sizes, half=st.integers(1, 30), T=tokens, seed=seeds)
def test_rope_chunks_adjoint(d_in: int, half: int, T: int, seed: int) -> None:
    """C x rotates chunk b by R_b, which the operator folds into the mixing: with M = I, mixing(I) = R_b."""
    r_hat = 2 * half
    op = RopeChunks(d_in, r_hat)
    rotations = op.mixing(torch.eye(r_hat, dtype=torch.float64))  # (n_chunks, r_hat, r_hat)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, dtype=torch.float64, generator=gen)
    chunks = op.apply(x)
    cx = torch.einsum("bij,tbj->tbi", rotations, chunks)
    # The standard rotate-half RoPE of each chunk at position b, angles b * 10000^(-2k / r_hat).
    angles = torch.arange(op.n_chunks, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat
    )
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rotate_half = torch.cat((-chunks[..., half:], chunks[..., :half]), dim=-1)
    torch.testing.assert_close(cx, chunks * cos + rotate_half * sin, rtol=1e-12, atol=1e-12)
    g = torch.randn(cx.shape, dtype=torch.float64, generator=gen)
    ctg = op.adjoint(torch.einsum("bij,tbi->tbj", rotations, g))  # C^T g = chunk-adjoint of R_b^T g_b
    torch.testing.assert_close(inner(cx, g), inner(x, ctg), rtol=1e-12, atol=1e-12)


@FAST
@given(d_out=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_tile_adjoint(d_out: int, r_hat: int, T: int, seed: int) -> None:
    check_decompression(Tile(d_out, r_hat), (T, r_hat), seed)


@FAST
@given(d_in=sizes, d_out=st.integers(1, 150), r_hat=sizes, T=tokens, seed=seeds)
def test_concatenate_adjoint(d_in: int, d_out: int, r_hat: int, T: int, seed: int) -> None:
    op = Concatenate.after(WrapChunks(d_in, r_hat), d_out)
    assert isinstance(op, Concatenate)
    check_decompression(op, (T, op.n_chunks, r_hat), seed)


@FAST
@given(d_out=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_repeat_adjoint(d_out: int, r_hat: int, T: int, seed: int) -> None:
    check_decompression(Repeat(d_out, r_hat), (T, r_hat), seed)


@FAST
@given(d_out=sizes, r_hat=sizes, T=tokens, seed=seeds)
def test_zero_pad_adjoint(d_out: int, r_hat: int, T: int, seed: int) -> None:
    r_hat = min(d_out, r_hat)  # writes r_hat <= d_out outputs
    check_decompression(ZeroPad(d_out, r_hat), (T, r_hat), seed)


@FAST
@given(
    kind=st.sampled_from([Tile, Repeat, ZeroPad]),
    d_in=sizes,
    d_out=sizes,
    r_hat=sizes,
    mode=st.sampled_from(["copy", "add", "sub"]),
)
def test_rows_into_writes_D_times_B(
    kind: type[Decompression], d_in: int, d_out: int, r_hat: int, mode: RowMode
) -> None:
    """delta_W's rows written with broadcasting views equal D applied to every column of B."""
    if kind is ZeroPad:
        r_hat = min(d_out, r_hat)
    op = kind(d_out, r_hat)
    B = torch.randn(r_hat, d_in, dtype=torch.float64)
    dst = torch.randn(d_out, d_in, dtype=torch.float64)
    expected = decompress(op, B.T).T
    expected = {"copy": expected, "add": dst + expected, "sub": dst - expected}[mode]
    op.rows_into(dst, B, mode)
    torch.testing.assert_close(dst, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", list(MORA_OPERATORS))
def test_every_type_builds_its_branch(kind: str) -> None:
    compression_type, decompression_type = MORA_OPERATORS[kind]
    branch = build_branch(compression_type(20, 6), decompression_type, 30)
    chunked = issubclass(compression_type, WrapChunks)
    assert isinstance(branch, ChunkedBranch if chunked else SquareBranch)
    assert (branch.d_in, branch.d_out, branch.r_hat) == (20, 30, 6)


def test_chunks_and_concatenate_only_go_together() -> None:
    with pytest.raises(TypeError, match="Concatenate"):
        build_branch(WrapChunks(20, 6), Tile, 30)
    with pytest.raises(TypeError, match="Concatenate"):
        build_branch(WrapSum(20, 6), Concatenate, 30)

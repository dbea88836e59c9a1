"""MoRA's compressions C and decompressions D as operator classes, each with its adjoint beside it.

The update of a MoRA layer is ``delta(x) = D(M C(x))``; activations are 2-D ``(T, features)``.

* A compression maps ``(T, d_in)`` to ``(T, r_hat)`` — or, for the chunked types, to ``(T, n_chunks, r_hat)``
  chunks that each meet their own ``r_hat x r_hat`` matrix. ``apply`` is C, ``adjoint`` is its transpose
  (the backward, and ``M C`` for delta_W).
* A decompression maps ``(T, r_hat)`` back to ``(T, d_out)``. ``add_into`` adds D's output into the frozen
  layer's output in place (no d_out-wide temporary), ``adjoint`` is its transpose, and ``rows_into`` writes
  delta_W = D . B into a (d_out, d_in) tensor with broadcasting views (no Python loop over rows or tiles).

Every D only selects rows (tile, repeat over groups, or place and zero-fill), so ``delta_W = D . B`` where
``B`` is a small pre-image: ``M C`` (``SquareOperators``) or the block matrix of the per-chunk matrices
(``ChunkedOperators``). The RoPE rotation of type 6 is folded into those matrices, ``M_b = M R_b``, so
all chunks go through one batched matmul instead of rotating the activation element-wise.

Index maps and RoPE tables are recomputed per device/dtype and cached, never saved as buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

ROPE_BASE = 10000.0

# How delta_W rows reach the destination: overwrite it, or add/subtract them (merge, unmerge).
RowMode = Literal["copy", "add", "sub"]


def _put(target: torch.Tensor, src: torch.Tensor, mode: RowMode) -> None:
    if mode == "copy":
        target.copy_(src)
    else:
        target.add_(src, alpha=1.0 if mode == "add" else -1.0)


class _ContiguousGroups:
    """``total`` features in ``r_hat`` contiguous groups; the first ``long_groups`` hold ``group_size + 1``."""

    def __init__(self, total: int, r_hat: int) -> None:
        self.r_hat = r_hat
        self.group_size, self.long_groups = total // r_hat, total % r_hat
        self.long_span = self.long_groups * (self.group_size + 1)  # features covered by the long groups

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """(T, total) -> (T, r_hat): the sum over each group."""
        T, a, s = t.shape[0], self.long_groups, self.group_size
        rest = t[:, self.long_span :].reshape(T, self.r_hat - a, s).sum(2)
        if a == 0:
            return rest
        return torch.cat((t[:, : self.long_span].reshape(T, a, s + 1).sum(2), rest), dim=1)


# -- compressions: (T, d_in) -> (T, r_hat) -------------------------------------------------------------


class Compression(ABC):
    def __init__(self, d_in: int, r_hat: int) -> None:
        self.d_in, self.r_hat = d_in, r_hat

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """C x."""

    @abstractmethod
    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """C^T g, shaped (T, d_in)."""


class _CyclicPadding(Compression):
    """The input padded cyclically to ``n_chunks`` whole r_hat-chunks: padded feature j is x[j mod d_in].

    The official code pads with the first features once; cycling also covers r_hat > 2 d_in.
    """

    def __init__(self, d_in: int, r_hat: int) -> None:
        super().__init__(d_in, r_hat)
        self.whole_chunks, self.tail = d_in // r_hat, d_in % r_hat  # chunks of the unpadded input
        self.n_chunks = max(1, -(-d_in // r_hat))
        self.padded = self.n_chunks * r_hat
        self._last_chunk: dict[torch.device, torch.Tensor] = {}

    def last_chunk_index(self, device: torch.device) -> torch.Tensor:
        """The input features the last chunk of the padded input reads (wrapping around)."""
        index = self._last_chunk.get(device)
        if index is None:
            index = (self.whole_chunks * self.r_hat + torch.arange(self.r_hat, device=device)) % self.d_in
            self._last_chunk[device] = index
        return index


class WrapSum(_CyclicPadding):
    """Types 1 and 4 (paper Eq. 6): the sum of the cyclically padded input's r_hat-chunks."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        T, r, whole = x.shape[0], self.r_hat, self.whole_chunks
        if self.tail == 0:
            return x if whole == 1 else x.reshape(T, whole, r).sum(1)
        z = x.index_select(1, self.last_chunk_index(x.device))
        if whole:
            z.add_(x[:, : whole * r].reshape(T, whole, r).sum(1))
        return z

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        T, r, whole = g.shape[0], self.r_hat, self.whole_chunks
        out = g.new_empty(T, self.d_in)
        if whole:
            out[:, : whole * r].view(T, whole, r).copy_(g.unsqueeze(1).expand(T, whole, r))
        if self.tail:
            out[:, whole * r :].zero_()
            out.index_add_(1, self.last_chunk_index(g.device), g)
        return out


class GroupSum(Compression):
    """Types 2 and 3: the sum of each of r_hat contiguous groups of input features."""

    def __init__(self, d_in: int, r_hat: int) -> None:
        super().__init__(d_in, r_hat)
        self.groups = _ContiguousGroups(d_in, r_hat)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups.sum(x)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        T, r = g.shape[0], self.r_hat
        a, s, span = self.groups.long_groups, self.groups.group_size, self.groups.long_span
        out = g.new_empty(T, self.d_in)
        if a:
            out[:, :span].view(T, a, s + 1).copy_(g[:, :a, None].expand(T, a, s + 1))
        if s:
            out[:, span:].view(T, r - a, s).copy_(g[:, a:, None].expand(T, r - a, s))
        return out


class Truncate(Compression):
    """The truncation baseline: the first r_hat input features."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.r_hat]

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        out = g.new_zeros(g.shape[0], self.d_in)
        out[:, : self.r_hat] = g
        return out


class WrapChunks(_CyclicPadding):
    """Type 6 without the rotation ('decouple'): the padded input's chunks, (T, n_chunks, r_hat), each
    multiplied by its own copy of M (``mixing``)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        T, d_in, r = x.shape[0], self.d_in, self.r_hat
        if self.tail == 0:  # a view
            return x.reshape(T, self.n_chunks, r)
        if r <= d_in:
            return torch.cat((x, x[:, : self.padded - d_in]), dim=1).view(T, self.n_chunks, r)
        return x.index_select(1, self.last_chunk_index(x.device)).view(T, 1, r)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        T, d_in, r = g.shape[0], self.d_in, self.r_hat
        flat = g.reshape(T, self.padded)
        if self.tail == 0:
            return flat
        if r <= d_in:
            out = flat[:, :d_in].clone()
            out[:, : self.padded - d_in] += flat[:, d_in:]
            return out
        return g.new_zeros(T, d_in).index_add_(1, self.last_chunk_index(g.device), flat)

    def mixing(self, M: torch.Tensor) -> torch.Tensor:
        """The per-chunk matrices (n_chunks, r_hat, r_hat), differentiable in M."""
        # A real copy per chunk: batched matmuls over a stride-0 (expanded) batch are far slower.
        return M.unsqueeze(0).repeat(self.n_chunks, 1, 1)

    def add_block_rows(self, dst: torch.Tensor, blocks: torch.Tensor, rows: int, sign: float) -> None:
        """Add the first ``rows`` rows of B to every tile of dst (tiles, rows, d_in), B the block pre-image.

        Row b*r_hat + i of B holds blocks[b, i, k] at column (b*r_hat + k) mod d_in.
        """
        d_in, r, whole, tail = self.d_in, self.r_hat, self.whole_chunks, self.tail
        if r > d_in:  # a single chunk whose columns wrap around the input more than once
            src = blocks[0, :rows].expand(dst.shape[0], rows, r)
            dst.index_add_(2, self.last_chunk_index(dst.device), src, alpha=sign)
            return
        row_blocks, part = divmod(rows, r)  # whole row-blocks, then rows of a partial block
        diagonal = min(row_blocks, whole)  # blocks sitting on the diagonal without wrapping
        if diagonal:
            span = diagonal * r
            diag = dst[:, :span, :span].unflatten(1, (diagonal, r)).unflatten(3, (diagonal, r))
            diag.diagonal(dim1=1, dim2=3).add_(blocks[:diagonal].permute(1, 2, 0), alpha=sign)
        if row_blocks < whole and part:  # partial diagonal block
            start = row_blocks * r
            dst[:, start:rows, start : start + r].add_(blocks[row_blocks, :part], alpha=sign)
        if tail and rows > whole * r:  # last chunk: its tail wraps around to the first features
            last = blocks[whole, : rows - whole * r]
            dst[:, whole * r : rows, whole * r :].add_(last[:, :tail], alpha=sign)
            dst[:, whole * r : rows, : r - tail].add_(last[:, tail:], alpha=sign)


class RopeChunks(WrapChunks):
    """Type 6 (paper Eq. 9): chunk b rotated by RoPE angles b * 10000^(-2k/r_hat) before M.

    ``apply`` leaves the chunks unrotated: the rotation R_b is folded into the per-chunk matrices
    ``mixing(M) = M R_b``, which only needs M's columns scaled by cos/sin and swapped (O(n_chunks r_hat^2)).
    """

    def __init__(self, d_in: int, r_hat: int) -> None:
        super().__init__(d_in, r_hat)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every chunk's angles, (n_chunks, r_hat)."""
        key = (device, dtype)
        tables = self._tables.get(key)
        if tables is None:
            r = self.r_hat
            # Angles in float64 then cast, so low-precision tables are correctly rounded.
            inv_freq = ROPE_BASE ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
            freqs = torch.outer(torch.arange(self.n_chunks, dtype=torch.float64), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # pair (k, k + r_hat/2) shares angle k
            tables = (emb.cos().to(device, dtype), emb.sin().to(device, dtype))
            self._tables[key] = tables
        return tables

    def mixing(self, M: torch.Tensor) -> torch.Tensor:
        """M_b = M R_b, R_b rotating pairs (k, k + r_hat/2) in the rotate-half convention."""
        h = self.r_hat // 2
        cos, sin = self.rope_tables(M.device, M.dtype)
        swapped = torch.cat((M[:, h:], -M[:, :h]), dim=1)
        return M.unsqueeze(0) * cos.unsqueeze(1) + swapped.unsqueeze(0) * sin.unsqueeze(1)


# -- decompressions: (T, r_hat) -> (T, d_out), added into the layer's output ---------------------------


class Decompression(ABC):
    def __init__(self, d_out: int, r_hat: int) -> None:
        self.d_out, self.r_hat = d_out, r_hat

    @classmethod
    def after(cls, compression: Compression, d_out: int) -> Decompression:
        """The decompression reading ``compression``'s output."""
        return cls(d_out, compression.r_hat)

    @abstractmethod
    def add_into(self, res: torch.Tensor, out: torch.Tensor) -> None:
        """res (T, d_out) += D out."""

    @abstractmethod
    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """D^T g for g (T, d_out)."""

    @abstractmethod
    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        """dst (d_out, d_in) :=, += or -= D . B for B (r_hat, d_in)."""


class Tile(Decompression):
    """Types 1, 3: output i is input i mod ``period`` (r_hat here)."""

    @property
    def period(self) -> int:
        return self.r_hat

    def add_into(self, res: torch.Tensor, out: torch.Tensor) -> None:
        T, L = res.shape[0], self.period
        o = out.reshape(T, L)
        tiles, rest = divmod(self.d_out, L)
        if tiles:
            res[:, : tiles * L].view(T, tiles, L).add_(o.unsqueeze(1))
        if rest:
            res[:, tiles * L :].add_(o[:, :rest])

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        T, L = g.shape[0], self.period
        tiles, rest = divmod(self.d_out, L)
        if tiles == 1 and not rest:  # d_out equals the period: the adjoint is the identity
            return g if g.is_contiguous() else g.contiguous()
        if tiles:
            acc = g[:, : tiles * L].reshape(T, tiles, L).sum(1)
            if rest:
                acc[:, :rest] += g[:, tiles * L :]
            return acc
        acc = g.new_zeros(T, L)
        acc[:, :rest] = g
        return acc

    def row_tiles(self, dst: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """dst's rows as (tiles, rows, ...) views and their row counts: the whole tiles, then the partial one."""
        L = self.period
        tiles, rest = divmod(self.d_out, L)
        views = [(dst[: tiles * L].view(tiles, L, *dst.shape[1:]), L)] if tiles else []
        if rest:
            views.append((dst[tiles * L :].unsqueeze(0), rest))
        return views

    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        for view, rows in self.row_tiles(dst):
            _put(view, B[:rows].unsqueeze(0), mode)


class Concatenate(Tile):
    """Type 6: the n_chunks chunk outputs side by side, tiled with period n_chunks * r_hat over d_out."""

    def __init__(self, d_out: int, r_hat: int, n_chunks: int) -> None:
        super().__init__(d_out, r_hat)
        self.n_chunks = n_chunks

    @classmethod
    def after(cls, compression: Compression, d_out: int) -> Decompression:
        if not isinstance(compression, WrapChunks):
            raise TypeError(f"Concatenate reads chunks (WrapChunks), not {type(compression).__name__}")
        return cls(d_out, compression.r_hat, compression.n_chunks)

    @property
    def period(self) -> int:
        return self.n_chunks * self.r_hat

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """(T, d_out) -> (T, n_chunks, r_hat): the tiles folded back onto one period."""
        return super().adjoint(g).view(g.shape[0], self.n_chunks, self.r_hat)


class Repeat(Decompression):
    """Types 2, 4: r_hat contiguous output groups, each a copy of one input (the adjoint of GroupSum)."""

    def __init__(self, d_out: int, r_hat: int) -> None:
        super().__init__(d_out, r_hat)
        self.groups = _ContiguousGroups(d_out, r_hat)

    def add_into(self, res: torch.Tensor, out: torch.Tensor) -> None:
        T, r = res.shape[0], self.r_hat
        a, s, span = self.groups.long_groups, self.groups.group_size, self.groups.long_span
        if a:
            res[:, :span].view(T, a, s + 1).add_(out[:, :a, None])
        if s:
            res[:, span:].view(T, r - a, s).add_(out[:, a:, None])

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        return self.groups.sum(g)

    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        r = self.r_hat
        a, s, span = self.groups.long_groups, self.groups.group_size, self.groups.long_span
        if a:
            _put(dst[:span].view(a, s + 1, -1), B[:a, None, :], mode)
        if s:
            _put(dst[span:].view(r - a, s, -1), B[a:, None, :], mode)


class ZeroPad(Decompression):
    """The truncation baseline: the first r_hat outputs, zeros elsewhere."""

    def add_into(self, res: torch.Tensor, out: torch.Tensor) -> None:
        res[:, : self.r_hat].add_(out)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        return g[:, : self.r_hat]

    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        _put(dst[: self.r_hat], B, mode)
        if mode == "copy":
            dst[self.r_hat :].zero_()

"""MoRA: high-rank updating with one square matrix (arXiv 2405.12130).

For a frozen ``nn.Linear`` ``W`` (d_out x d_in) the adapter adds

    delta(x) = f_decomp(M . f_comp(x)),    M: (r_hat x r_hat), zero-initialised, scale 1,

with ``r_hat = floor(sqrt((d_in + d_out) * rank) + 0.5)`` so that MoRA trains as many
parameters as LoRA of the same rank. The operator table (names and official numbers) is in README.md, "Adapters".

Every operator pair is linear, so the whole update is ``delta_W = D . B`` where ``B`` is a
small "pre-image" matrix (``M C`` for the summing types, a block matrix of ``M R_b`` for the
chunked types) and ``D`` only selects rows of ``B`` (tile, repeat over groups, or place and
zero-fill). That factorisation drives everything here:

* the forward never materialises a d_out-wide temporary: the r_hat (or chunk) outputs are
  added in place into the frozen layer's output through strided views;
* the RoPE rotation of type 6 is folded into per-chunk matrices ``M_b = M R_b`` and all chunks
  go through one batched matmul instead of rotating the activation element-wise;
* ``delta_weight()``/``merge()`` build ``B`` with index maps and copy/add its rows with
  broadcasting, no Python loop over columns or chunks.

Shapes the official code (GitHub kongds/MoRA) cannot run are generalised: the wrap-around
padding is cyclic (padded feature ``j`` is ``x[j mod d_in]``), so ``r_hat >= d_in`` and
``r_hat > 2 d_in`` work for the sharing/RoPE types, and the type-6 delta weight is defined
for a single chunk. Only two combinations are refused (see ``mora_shape_problem``).
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any

import torch
from torch import nn

__all__ = [
    "MORA_TYPES",
    "MORA_TYPE_DESCRIPTIONS",
    "MoRALinear",
    "mora_shape_problem",
    "mora_square_side",
    "resolve_mora_type",
]

MORA_TYPES: dict[str, int | None] = {
    "sharing": 1,
    "grouping": 2,
    "group_tile": 3,
    "share_group": 4,
    "rope": 6,
    "decouple": None,
    "truncation": None,
}

MORA_TYPE_DESCRIPTIONS: dict[str, str] = {
    "sharing": "type 1, paper Eq. 6: wrap-pad x, sum its r_hat-chunks; tile the r_hat outputs (good for large rank)",
    "grouping": "type 2: sum contiguous groups of input features; repeat each output over a contiguous group",
    "group_tile": "type 3: sum contiguous groups of input features; tile the r_hat outputs",
    "share_group": "type 4: wrap-pad x, sum its r_hat-chunks; repeat each output over a contiguous group",
    "rope": (
        "type 6, paper Eq. 9: wrap-pad x, rotate chunk b by RoPE angles, M on every chunk, concatenate "
        "(good for small rank)"
    ),
    "decouple": "type 6 without the rotation: M on every wrap-padded chunk, concatenate",
    "truncation": "paper baseline: keep the first r_hat input features, write the first r_hat outputs, zeros elsewhere",
}

# (compression kind, decompression kind) per canonical type.
_OPERATORS: dict[str, tuple[str, str]] = {
    "sharing": ("wrap", "tile"),
    "grouping": ("group", "repeat"),
    "group_tile": ("group", "tile"),
    "share_group": ("wrap", "repeat"),
    "rope": ("chunk", "tile"),
    "decouple": ("chunk", "tile"),
    "truncation": ("trunc", "trunc"),
}

_ROPE_BASE = 10000.0


def _valid_types_text() -> str:
    names = ", ".join(f"'{k}'" + (f" ({v})" if v is not None else "") for k, v in MORA_TYPES.items())
    return f"valid MoRA types are {names}; the official numbers 1, 2, 3, 4, 6 are accepted as int or string"


def resolve_mora_type(value: str | int) -> str:
    """Map a canonical name or an official type number (int or its string) to the canonical name."""
    if isinstance(value, bool):  # bool is an int subclass; True must not silently mean type 1
        raise ValueError(f"Unknown MoRA type {value!r}: {_valid_types_text()}.")
    if isinstance(value, Integral):
        for name, number in MORA_TYPES.items():
            if number is not None and number == int(value):
                return name
        raise ValueError(f"Unknown MoRA type {value!r}: {_valid_types_text()}.")
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        if key in MORA_TYPES:
            return key
        if key.isdigit():
            for name, number in MORA_TYPES.items():
                if number is not None and number == int(key):
                    return name
    raise ValueError(f"Unknown MoRA type {value!r}: {_valid_types_text()}.")


# adapter.mora_type=auto: the paper's recommendation by rank. The official README: "type 6 (RoPE based) for
# small ranks", type 1 (Eq. 6) otherwise; the paper's runs use RoPE at r=8 (UUID memorization, MetaMath) and
# sharing at r=256 (memorization) and r=128 (pretraining, with ReMoRA's types 1/2). Ranks below the smallest
# rank it ran with sharing get RoPE; from there on, sharing (which also costs T·r̂² instead of RoPE's T·d_in·r̂).
AUTO = "auto"
AUTO_SHARING_FROM_RANK = 128


def choose_mora_type(value: str | int, rank: int) -> str:
    """The canonical type for adapter.mora_type=value at this rank: `auto` follows the paper's rule (rope
    below rank AUTO_SHARING_FROM_RANK, sharing from it on); anything else is resolve_mora_type(value)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        if isinstance(rank, bool) or not isinstance(rank, Integral) or rank <= 0:
            raise ValueError(f"adapter.mora_type=auto chooses by rank, which must be a positive integer (got {rank!r})")
        return "rope" if rank < AUTO_SHARING_FROM_RANK else "sharing"
    return resolve_mora_type(value)


def mora_square_side(d_in: int, d_out: int, rank: int, mora_type: str | int) -> int:
    """r_hat = floor(sqrt((d_in + d_out) * rank) + 0.5), rounded down to even for 'rope'."""
    kind = resolve_mora_type(mora_type)
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank <= 0:
        raise ValueError(f"MoRA rank must be a positive integer, got {rank!r}.")
    # Same float formula as the official code, so r_hat (and results) match it exactly.
    side = int(math.sqrt((int(d_in) + int(d_out)) * int(rank)) + 0.5)
    if kind == "rope":
        side = side // 2 * 2  # RoPE rotates feature pairs (k, k + r_hat/2)
    return side


def _largest_rank_with_side_at_most(d_in: int, d_out: int, limit: int, mora_type: str) -> int:
    """Largest rank whose r_hat is <= limit (0 when even rank 1 is too big)."""
    if limit < 1:
        return 0
    rank = int((limit + 0.5) ** 2 / (d_in + d_out)) + 2
    while rank >= 1 and mora_square_side(d_in, d_out, rank, mora_type) > limit:
        rank -= 1
    return rank


def mora_shape_problem(layer_name: str, d_in: int, d_out: int, rank: int, mora_type: str | int) -> str | None:
    """None when MoRA of this type and rank represents the layer exactly; otherwise why not.

    Refusal policy (everything else works, including r_hat >= d_in, r_hat > 2 d_in, r_hat > d_out):
    * 'truncation' needs r_hat <= min(d_in, d_out): it keeps r_hat input features and writes r_hat
      outputs, which do not exist beyond the layer's shape;
    * 'rope' needs r_hat >= 2 (a 1x1 layer at rank 1 rounds r_hat down to 0).
    Non-positive ranks or feature counts are reported too.
    """
    kind = resolve_mora_type(mora_type)
    name = layer_name or "<unnamed layer>"
    where = f"Layer '{name}' (d_out x d_in = {d_out} x {d_in})"
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank <= 0:
        return f"{where}: MoRA rank must be a positive integer, got {rank!r}."
    if d_in < 1 or d_out < 1:
        return f"{where}: MoRA needs at least one input and one output feature."
    side = mora_square_side(d_in, d_out, rank, kind)
    if kind == "truncation":
        limit = min(d_in, d_out)
        if side <= limit:
            return None
        best = _largest_rank_with_side_at_most(d_in, d_out, limit, kind)
        if best >= 1:
            advice = (
                f"The largest usable rank for this layer and type is {best} "
                f"(r_hat = {mora_square_side(d_in, d_out, best, kind)})"
            )
        else:
            advice = "No rank works for this layer with this type (rank 1 already gives r_hat > min(d_in, d_out))"
        return (
            f"{where} cannot use MoRA type 'truncation' at rank {rank}: r_hat = {side}, but truncation keeps the "
            f"first r_hat input features and writes the first r_hat outputs, so it needs r_hat <= min(d_in, d_out) "
            f"= {limit}. {advice}; lower the rank, pick a type that works for every shape (e.g. 'sharing'), "
            f"or leave this layer out of the target modules."
        )
    if kind == "rope" and side < 2:
        smallest = 1
        while mora_square_side(d_in, d_out, smallest, kind) < 2:
            smallest += 1
        return (
            f"{where} cannot use MoRA type 'rope' at rank {rank}: r_hat = {side} after rounding down to even, but "
            f"RoPE rotates feature pairs and needs r_hat >= 2. No rank below {smallest} is usable for this layer "
            f"and type (rank {smallest} gives r_hat = {mora_square_side(d_in, d_out, smallest, kind)}; larger ranks "
            f"all work); raise the rank, pick another type (e.g. 'sharing'), or leave this layer out."
        )
    return None


class _Operators:
    """Integer geometry and the linear maps of one (d_in, d_out, r_hat, type) combination.

    Activations are handled as 2-D ``(T, features)``. ``compress``/``decompress_add_`` run the
    forward; ``compress_t``/``decompress_t`` are their adjoints (the backward); ``rows_into``
    writes delta_W = D . B into a (d_out, d_in) tensor. Index maps are cached per device.
    """

    def __init__(self, d_in: int, d_out: int, side: int, kind: str) -> None:
        self.n, self.m, self.r, self.kind = d_in, d_out, side, kind
        self.comp, self.decomp = _OPERATORS[kind]
        n, r = d_in, side
        self.full = n // r  # whole r-chunks of the unpadded input
        self.rem_in = n % r
        self.n_chunks = max(1, -(-n // r))
        self.padded = self.n_chunks * r  # length of the cyclically padded input
        # Contiguous input groups (official types 2/3): the first `a_in` groups hold s_in + 1 features.
        self.s_in, self.a_in = n // r, n - r * (n // r)
        self.s_out, self.a_out = d_out // r, d_out - r * (d_out // r)
        # Rows of the (block) pre-image that delta_W repeats: the tile period of the chunked types.
        self.period = self.padded if self.comp == "chunk" else r
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._rope_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- derived tables (never buffers: they are recomputed per device/dtype, never saved) ----------
    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        idx = self._cache.get(key)
        if idx is None:
            n, r = self.n, self.r
            if name == "wrap":  # last (partial) chunk of the padded input, cyclically wrapped
                idx = (self.full * r + torch.arange(r, device=device)) % n
            elif name == "cycle":  # single chunk longer than the input (r > d_in)
                idx = torch.arange(r, device=device) % n
            else:
                raise KeyError(name)
            self._cache[key] = idx
        return idx

    def rope_tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        tables = self._rope_cache.get(key)
        if tables is None:
            r = self.r
            # Angles in float64 then cast, so low-precision tables are correctly rounded.
            inv_freq = _ROPE_BASE ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
            freqs = torch.outer(torch.arange(self.n_chunks, dtype=torch.float64), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # pair (k, k + r/2) shares angle k
            tables = (emb.cos().to(device, dtype), emb.sin().to(device, dtype))
            self._rope_cache[key] = tables
        return tables

    def mixing(self, M: torch.Tensor) -> torch.Tensor:
        """The matrix (or per-chunk matrices) applied between compression and decompression.

        Differentiable in M. For 'rope', chunk b sees M_b = M R_b where R_b rotates pairs
        (k, k + r/2) by b * 10000^(-2k/r) in the rotate-half convention; M R_b only needs
        M's columns scaled by cos/sin and swapped, an O(n_chunks r^2) element-wise op.
        """
        if self.kind == "rope":
            h = self.r // 2
            cos, sin = self.rope_tables(M.device, M.dtype)
            swapped = torch.cat((M[:, h:], -M[:, :h]), dim=1)
            return M.unsqueeze(0) * cos.unsqueeze(1) + swapped.unsqueeze(0) * sin.unsqueeze(1)
        if self.kind == "decouple":
            # A real copy per chunk: batched matmuls over a stride-0 (expanded) batch are far slower.
            return M.unsqueeze(0).repeat(self.n_chunks, 1, 1)
        return M

    # -- compression (T, d_in) -> (T, r) or (T, n_chunks, r), and its adjoint -----------------------
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        T, n, r = x.shape[0], self.n, self.r
        if self.comp == "wrap":
            if self.rem_in == 0:
                return x if self.full == 1 else x.reshape(T, self.full, r).sum(1)
            z = x.index_select(1, self._index("wrap", x.device))
            if self.full:
                z.add_(x[:, : self.full * r].reshape(T, self.full, r).sum(1))
            return z
        if self.comp == "group":
            A = self.a_in * (self.s_in + 1)
            rest = x[:, A:].reshape(T, r - self.a_in, self.s_in).sum(2)
            if self.a_in == 0:
                return rest
            return torch.cat((x[:, :A].reshape(T, self.a_in, self.s_in + 1).sum(2), rest), dim=1)
        if self.comp == "trunc":
            return x[:, :r]
        # chunk: cyclically padded input cut into chunks (a view when d_in is a multiple of r)
        if self.rem_in == 0:
            return x.reshape(T, self.n_chunks, r)
        if r <= n:
            return torch.cat((x, x[:, : self.padded - n]), dim=1).view(T, self.n_chunks, r)
        return x.index_select(1, self._index("cycle", x.device)).view(T, 1, r)

    def compress_t(self, g: torch.Tensor) -> torch.Tensor:
        """Adjoint of compress: (T, r) or (T, n_chunks, r) -> (T, d_in). Also gives B = M C."""
        T, n, r = g.shape[0], self.n, self.r
        if self.comp == "wrap":
            out = g.new_empty(T, n)
            if self.full:
                out[:, : self.full * r].view(T, self.full, r).copy_(g.unsqueeze(1).expand(T, self.full, r))
            if self.rem_in:
                out[:, self.full * r :].zero_()
                out.index_add_(1, self._index("wrap", g.device), g)
            return out
        if self.comp == "group":
            out = g.new_empty(T, n)
            A, a, s = self.a_in * (self.s_in + 1), self.a_in, self.s_in
            if a:
                out[:, :A].view(T, a, s + 1).copy_(g[:, :a, None].expand(T, a, s + 1))
            if s:
                out[:, A:].view(T, r - a, s).copy_(g[:, a:, None].expand(T, r - a, s))
            return out
        if self.comp == "trunc":
            out = g.new_zeros(T, n)
            out[:, :r] = g
            return out
        flat = g.reshape(T, self.padded)
        if self.rem_in == 0:
            return flat
        if r <= n:
            out = flat[:, :n].clone()
            out[:, : self.padded - n] += flat[:, n:]
            return out
        return g.new_zeros(T, n).index_add_(1, self._index("cycle", g.device), flat)

    # -- the whole branch: forward (in place) and backward ------------------------------------------
    def forward_add_(self, res: torch.Tensor, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """res += delta(x); returns what backward needs besides mix (z, or x for chunked types)."""
        if self.comp != "chunk":
            z = self.compress(x)
            self.decompress_add_(res, torch.mm(z, mix.t()))
            return z
        T, m, r = x.shape[0], self.m, self.r
        xc = self.compress(x)
        if m <= self.padded and res.dtype == xc.dtype:
            # Output i reads chunk i // r, so only the first ceil(d_out / r) chunks matter (fewer
            # than all of them for down-projections); their products go straight into res.
            k, part = divmod(m, r)
            if k:
                res[:, : k * r].view(T, k, r).transpose(0, 1).baddbmm_(
                    xc[:, :k].transpose(0, 1), mix[:k].transpose(1, 2)
                )
            if part:
                res[:, k * r :].addmm_(xc[:, k], mix[k, :part].t())
        else:
            out = xc.new_empty(xc.shape)
            # One batched matmul over chunks; the strided views keep the (T, chunk, r) layout, so
            # `out` is already the concatenation of the chunk outputs (no permute copy).
            torch.bmm(xc.transpose(0, 1), mix.transpose(1, 2), out=out.transpose(0, 1))
            self.decompress_add_(res, out)
        # The chunks are recomputed in backward (a view unless padding was needed) instead of kept.
        return x

    def backward(
        self, grad: torch.Tensor, saved: torch.Tensor, mix: torch.Tensor, need_x: bool, need_mix: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradients of the branch w.r.t. its input x and its mixing matrix (M or the M_b)."""
        g = grad.to(mix.dtype)
        grad_x = grad_mix = None
        if self.comp != "chunk":
            gz = self.decompress_t(g)
            if need_mix:
                grad_mix = torch.mm(gz.t(), saved)
            if need_x:
                grad_x = self.compress_t(torch.mm(gz, mix))
            return grad_x, grad_mix
        T, m, r, nc = g.shape[0], self.m, self.r, self.n_chunks
        xc = self.compress(saved) if need_mix else None
        if m > self.padded:
            gout = self.decompress_t(g)  # (T, nc, r): the tiles folded back onto one period
            if need_mix:
                grad_mix = torch.bmm(gout.permute(1, 2, 0), xc.transpose(0, 1))  # type: ignore[union-attr]
            if need_x:
                gxc = gout.new_empty(gout.shape)
                torch.bmm(gout.transpose(0, 1), mix, out=gxc.transpose(0, 1))
                grad_x = self.compress_t(gxc)
            return grad_x, grad_mix
        # d_out <= padded: chunk b's gradient is a strided view of g (zero for unread chunks).
        g = g.contiguous()
        k, part = divmod(m, r)
        gk, gpart = g[:, : k * r].view(T, k, r), g[:, k * r :]
        used = k + (1 if part else 0)
        if need_mix:
            # Zeros: unread chunks and the unread rows of a partial chunk get no gradient (small tensor).
            grad_mix = mix.new_zeros(mix.shape)
            if k:
                torch.bmm(gk.permute(1, 2, 0), xc[:, :k].transpose(0, 1), out=grad_mix[:k])  # type: ignore[index]
            if part:
                torch.mm(gpart.t(), xc[:, k], out=grad_mix[k, :part])  # type: ignore[index]
        if need_x:
            gxc = g.new_empty(T, nc, r)
            if k:
                torch.bmm(gk.transpose(0, 1), mix[:k], out=gxc[:, :k].transpose(0, 1))
            if part:
                gxc[:, k] = torch.mm(gpart, mix[k, :part])
            if used < nc:
                gxc[:, used:].zero_()
            grad_x = self.compress_t(gxc)
        return grad_x, grad_mix

    # -- decompression: add into the (T, d_out) output, and its adjoint -------------------------------
    def decompress_add_(self, res: torch.Tensor, out: torch.Tensor) -> None:
        T, m, r = res.shape[0], self.m, self.r
        if self.decomp == "tile":
            L = self.period
            o = out.reshape(T, L)
            q, rem = divmod(m, L)
            if q:
                res[:, : q * L].view(T, q, L).add_(o.unsqueeze(1))
            if rem:
                res[:, q * L :].add_(o[:, :rem])
        elif self.decomp == "repeat":
            a, s = self.a_out, self.s_out
            A = a * (s + 1)
            if a:
                res[:, :A].view(T, a, s + 1).add_(out[:, :a, None])
            if s:
                res[:, A:].view(T, r - a, s).add_(out[:, a:, None])
        else:
            res[:, :r].add_(out)

    def decompress_t(self, g: torch.Tensor) -> torch.Tensor:
        T, m, r = g.shape[0], self.m, self.r
        if self.decomp == "tile":
            L = self.period
            q, rem = divmod(m, L)
            if q == 1 and not rem:  # d_out equals the period: the adjoint is the identity
                acc = g if g.is_contiguous() else g.contiguous()
            elif q:
                acc = g[:, : q * L].reshape(T, q, L).sum(1)
                if rem:
                    acc[:, :rem] += g[:, q * L :]
            else:
                acc = g.new_zeros(T, L)
                acc[:, :rem] = g
            return acc.view(T, self.n_chunks, r) if self.comp == "chunk" else acc
        if self.decomp == "repeat":
            a, s = self.a_out, self.s_out
            A = a * (s + 1)
            rest = g[:, A:].reshape(T, r - a, s).sum(2)
            if a == 0:
                return rest
            return torch.cat((g[:, :A].reshape(T, a, s + 1).sum(2), rest), dim=1)
        return g[:, :r]

    # -- delta_W = D . B -------------------------------------------------------------------------------
    def factor(self, M: torch.Tensor) -> torch.Tensor:
        """The small factor delta_W is assembled from.

        Summing/truncating types: B = M C, shape (r, d_in): rows of M pushed through the adjoint of
        compression, exactly as the backward pushes gradients, so delta_W and forward agree by
        construction. Chunked types: the per-chunk blocks M_b, shape (n_chunks, r, r); the
        (n_chunks r, d_in) block matrix is never built, its blocks are written straight into
        the destination by ``rows_into``.
        """
        if self.comp == "chunk":
            return self.mixing(M)
        return self.compress_t(M)

    def rows_into(self, dst: torch.Tensor, F: torch.Tensor, mode: str) -> None:
        """dst (d_out, d_in) := / += / -= delta_W (mode 'copy' | 'add' | 'sub'), F from ``factor``.

        Row tiling/grouping is done with broadcasting views, so a constant number of kernels
        runs whatever the number of chunks or tiles.
        """
        m, r = self.m, self.r
        if self.comp == "chunk":
            if mode == "copy":
                dst.zero_()  # outside the diagonal blocks delta_W is zero
            sign = -1.0 if mode == "sub" else 1.0
            L = self.period
            q, rem = divmod(m, L)
            if q:
                self._blocks_add(dst[: q * L].view(q, L, -1), F, L, sign)
            if rem:
                self._blocks_add(dst[q * L :].unsqueeze(0), F, rem, sign)
            return

        def put(target: torch.Tensor, src: torch.Tensor) -> None:
            if mode == "copy":
                target.copy_(src)
            else:
                target.add_(src, alpha=1.0 if mode == "add" else -1.0)

        if self.decomp == "tile":
            q, rem = divmod(m, r)
            if q:
                put(dst[: q * r].view(q, r, -1), F.unsqueeze(0))
            if rem:
                put(dst[q * r :], F[:rem])
        elif self.decomp == "repeat":
            a, s = self.a_out, self.s_out
            A = a * (s + 1)
            if a:
                put(dst[:A].view(a, s + 1, -1), F[:a, None, :])
            if s:
                put(dst[A:].view(r - a, s, -1), F[a:, None, :])
        else:
            put(dst[:r], F)
            if mode == "copy":
                dst[r:].zero_()

    def _blocks_add(self, dst: torch.Tensor, blocks: torch.Tensor, rows: int, sign: float) -> None:
        """Add the first `rows` rows of the block matrix to every tile of dst (tiles, rows, d_in).

        Row b*r + i of the block matrix holds blocks[b, i, k] at column (b*r + k) mod d_in.
        """
        n, r, full, rem_in = self.n, self.r, self.full, self.rem_in
        if r > n:  # a single chunk whose columns wrap around the input more than once
            src = blocks[0, :rows].expand(dst.shape[0], rows, r)
            dst.index_add_(2, self._index("cycle", dst.device), src, alpha=sign)
            return
        kb, part = divmod(rows, r)  # whole row-blocks, then rows of a partial block
        whole = min(kb, full)  # blocks sitting on the diagonal without wrapping
        if whole:
            diag = dst[:, : whole * r, : whole * r].unflatten(1, (whole, r)).unflatten(3, (whole, r))
            diag.diagonal(dim1=1, dim2=3).add_(blocks[:whole].permute(1, 2, 0), alpha=sign)
        if kb < full and part:  # partial diagonal block
            dst[:, kb * r : rows, kb * r : (kb + 1) * r].add_(blocks[kb, :part], alpha=sign)
        if rem_in and rows > full * r:  # last chunk: its tail wraps around to the first features
            last = blocks[full, : rows - full * r]
            dst[:, full * r : rows, full * r :].add_(last[:, :rem_in], alpha=sign)
            dst[:, full * r : rows, : r - rem_in].add_(last[:, rem_in:], alpha=sign)


class _MoRABranch(torch.autograd.Function):
    """result += decompress(mix(compress(x))), in place; hand-written backward.

    In place on the frozen layer's (fresh, 2-D) output so neither pass allocates a
    d_out-wide temporary; the backward passes the output gradient straight through.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, mix: torch.Tensor, ops: _Operators) -> torch.Tensor:
        saved = ops.forward_add_(result, x, mix)
        ctx.mark_dirty(result)
        ctx.ops = ops
        ctx.save_for_backward(saved, mix)
        ctx.x_dtype = x.dtype
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, mix = ctx.saved_tensors
        grad_x, grad_mix = ctx.ops.backward(grad, saved, mix, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return grad, grad_x, grad_mix, None


class MoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus the MoRA update ``f_decomp(M f_comp(dropout(x)))``."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        mora_type: str | int = "sharing",
        dropout: float = 0.0,
        layer_name: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoRALinear wraps torch.nn.Linear, got {type(base_layer).__name__} for '{layer_name}'.")
        kind = resolve_mora_type(mora_type)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        problem = mora_shape_problem(layer_name, d_in, d_out, rank, kind)
        if problem is not None:
            raise ValueError(problem)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.rank, self.mora_type, self.layer_name = int(rank), kind, layer_name
        self.r_hat = mora_square_side(d_in, d_out, rank, kind)
        weight = base_layer.weight
        # A quantized base (bitsandbytes 4-bit/8-bit codes) stores integers: M is then kept in float32, and
        # the branch runs in the base layer's compute dtype (the dtype of its output; see forward).
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, dtype=dtype, device=weight.device))
        self.mora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.merged = False
        self._ops = _Operators(d_in, d_out, self.r_hat, kind)

    # -- proxies so code reading `layer.weight` keeps working on a wrapped model --------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"mora_M": self.mora_M}

    def extra_repr(self) -> str:
        number = MORA_TYPES[self.mora_type]
        official = f" (official type {number})" if number is not None else ""
        return (
            f"d_in={self.in_features}, d_out={self.out_features}, rank={self.rank}, r_hat={self.r_hat}, "
            f"type={self.mora_type}{official}, merged={self.merged}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        lead = x.shape[:-1]
        # 2-D in: nn.Linear then returns a fresh tensor (not a view), which the branch can add
        # into in place without autograd's CopySlices cloning the whole gradient.
        x2 = x.reshape(-1, self.in_features)
        result = self.base_layer(x2)
        if not result.is_contiguous() or result._is_view():
            # The branch adds into this output in place, which autograd refuses on a view (a quantized kernel
            # may return its output reshaped from another tensor): a copy holds the same values.
            result = result.clone(memory_format=torch.contiguous_format)
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        # Without autocast the branch computes in the base output's dtype: M's own dtype on a float base,
        # the compute dtype on a quantized one (M.to() below is differentiable, so M's gradient stays float32).
        dtype = torch.get_autocast_dtype(device_type) if autocast else result.dtype
        xd = self.mora_dropout(x2).to(dtype)
        mix = self._ops.mixing(self.mora_M.to(dtype))
        if autocast:
            # Inputs are already cast; keep autocast from re-casting inside the hand-written passes.
            with torch.autocast(device_type=device_type, enabled=False):
                result = _MoRABranch.apply(result, xd, mix, self._ops)
        else:
            result = _MoRABranch.apply(result, xd, mix, self._ops)
        return result.view(*lead, self.out_features)

    def set_type(self, mora_type: str | int) -> None:
        """Switch the operator pair in place, keeping M (ReMoRA cycles types at each restart).

        The new type must give the same r̂ (rope rounds r̂ down to even, so it may not) and fit the
        layer's shape; otherwise ValueError names the layer, both types and both sides. Refused while
        merged: W then holds delta_W of the old operators, which the new ones could not unmerge.
        """
        kind = resolve_mora_type(mora_type)
        if kind == self.mora_type:
            return
        name = self.layer_name or "<unnamed layer>"
        if self.merged:
            raise ValueError(f"MoRA layer '{name}': unmerge before switching its type to '{kind}'.")
        problem = mora_shape_problem(self.layer_name, self.in_features, self.out_features, self.rank, kind)
        if problem is not None:
            raise ValueError(problem)
        side = mora_square_side(self.in_features, self.out_features, self.rank, kind)
        if side != self.r_hat:
            raise ValueError(
                f"Layer '{name}': MoRA type '{kind}' has r_hat = {side}, but the layer was built with r_hat = "
                f"{self.r_hat} (type '{self.mora_type}'); a layer can only switch between types of the same "
                "r_hat (rope rounds it down to even): sharing, grouping, group_tile and share_group always agree"
            )
        self.mora_type = kind
        self._ops = _Operators(self.in_features, self.out_features, self.r_hat, kind)

    # -- delta_W, merge, unmerge ----------------------------------------------------------------------
    def _math_dtype(self) -> torch.dtype:
        # float32 for fp32/bf16/fp16 weights; float64 stays float64 so exact checks remain exact.
        return torch.promote_types(self.mora_M.dtype, torch.float32)

    @torch.no_grad()
    def delta_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """delta_W (d_out, d_in) in float32 (float64 if M is float64), on M's device.

        `out`: a (d_out, d_in) tensor of that dtype to write into. For a large layer most of the cost
        of a fresh result is the kernel mapping in new pages (~50 ms for 4096 x 11008 on a small CPU
        VM, benchmarks/RESULTS.md); callers computing delta_W repeatedly can reuse one buffer.
        """
        M = self.mora_M.detach().to(self._math_dtype())
        if out is None:
            out = M.new_empty(self.out_features, self.in_features)
        elif out.shape != (self.out_features, self.in_features) or out.dtype != M.dtype or out.device != M.device:
            raise ValueError(
                f"MoRA layer '{self.layer_name or '<unnamed layer>'}': out must be a {self.out_features} x "
                f"{self.in_features} {M.dtype} tensor on {M.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}."
            )
        self._ops.rows_into(out, self._ops.factor(M), "copy")
        return out

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with delta_W = B @ A exactly, B (d_out, r_hat) and A (r_hat, d_in), float32 — or None.

        For the summing types and truncation delta_W = D M C with fixed 0/1 maps C (compression) and
        D (decompression): A = M C (what ``factor`` computes) and B = D, built by pushing the identity
        through the decompression, so the factors are the forward's own maps. The chunked types
        (rope, decouple) apply M to every chunk: delta_W is block-structured, not of this form (None).
        """
        if self._ops.comp == "chunk":
            return None
        M = self.mora_M.detach().to(self._math_dtype())
        A = self._ops.factor(M)
        eye = torch.eye(self.r_hat, dtype=A.dtype, device=A.device)
        D_t = torch.zeros(self.r_hat, self.out_features, dtype=A.dtype, device=A.device)
        self._ops.decompress_add_(D_t, eye)  # row k = D e_k
        return D_t.T.contiguous(), A.contiguous()

    @torch.no_grad()
    def _apply_delta(self, sign: str) -> None:
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            # Adding ΔW to 4-/8-bit codes would re-quantize it away; the adapter's merge_and_unload de-quantizes.
            raise ValueError(
                f"MoRA layer '{self.layer_name or '<unnamed layer>'}': its base weight is quantized ({weight.dtype}); "
                "merge through the adapter (MoraAdapter.merge_and_unload de-quantizes), not into the codes"
            )
        ops = self._ops
        factor = ops.factor(self.mora_M.detach().to(self._math_dtype()))
        # Only rows of the factor that reach delta_W matter (r_hat may exceed d_out).
        used = factor.reshape(-1, factor.shape[-1])[: min(self.out_features, ops.period)]
        if not torch.isfinite(used).all():
            raise ValueError(
                f"MoRA layer '{self.layer_name or '<unnamed layer>'}': delta weight has non-finite values "
                f"(NaN/Inf in mora_M); refusing to {'merge' if sign == 'add' else 'unmerge'}."
            )
        if weight.dtype == factor.dtype:
            # Straight into W with broadcasting: no d_out x d_in temporary.
            ops.rows_into(weight.data, factor.to(weight.device), sign)
            return
        updated = weight.data.to(factor.dtype)
        ops.rows_into(updated, factor.to(weight.device), sign)
        updated = updated.to(weight.dtype)
        if not torch.isfinite(updated).all():
            raise ValueError(
                f"MoRA layer '{self.layer_name or '<unnamed layer>'}': merged weight overflows {weight.dtype}."
            )
        weight.data.copy_(updated)

    def merge(self) -> None:
        """W += delta_W (in float32, cast back). A second call is a no-op."""
        if self.merged:
            return
        self._apply_delta("add")
        self.merged = True

    def fold_delta_(self) -> None:
        """W += ΔW (float32, checked finite), then M = 0: the layer computes the same function and trains on
        from ΔW = 0 (a ReMoRA restart). Not while merged."""
        if self.merged:
            raise RuntimeError(f"MoRA layer {self.layer_name!r}: fold_delta_ on a merged layer (unmerge first)")
        self._apply_delta("add")
        with torch.no_grad():
            self.mora_M.zero_()

    def unmerge(self) -> None:
        """W -= delta_W, restoring W up to float32 rounding. No-op when not merged."""
        if not self.merged:
            return
        self._apply_delta("sub")
        self.merged = False

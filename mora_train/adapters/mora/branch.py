"""The MoRA branch ``delta(x) = D(mix(C x))`` beside a frozen layer: forward, backward, delta_W.

A branch composes one compression C and one decompression D (``operators``) with the trained square M:

* ``SquareBranch``: one M between C and D, so ``delta_W = D M C`` — a LoRA-shaped product;
* ``ChunkedBranch``: M (rotated per chunk for RoPE) on every chunk of the padded input, the outputs
  concatenated — a block-structured delta_W.

The forward adds the branch into the frozen layer's fresh output in place (``add_branch_``), so neither
pass allocates a d_out-wide temporary; the backward is hand-written from the operators' adjoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from mora_train.adapters.mora.operators import (
    Compression,
    Concatenate,
    Decompression,
    RowMode,
    WrapChunks,
)

Gradients = tuple[torch.Tensor | None, torch.Tensor | None]


class MoRABranch(ABC):
    """One (C, D) pair at one layer shape; ``mix`` is what ``mixing(M)`` returns."""

    def __init__(self, compression: Compression, decompression: Decompression) -> None:
        self.compression, self.decompression = compression, decompression
        self.d_in, self.d_out, self.r_hat = compression.d_in, decompression.d_out, compression.r_hat

    @property
    @abstractmethod
    def period(self) -> int:
        """Rows of the pre-image ``factor`` that delta_W repeats."""

    @abstractmethod
    def mixing(self, M: torch.Tensor) -> torch.Tensor:
        """The matrix (or per-chunk matrices) between C and D; differentiable in M."""

    @abstractmethod
    def forward_add_(self, res: torch.Tensor, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """res += delta(x); returns the tensor backward needs besides mix."""

    @abstractmethod
    def backward(
        self, grad: torch.Tensor, saved: torch.Tensor, mix: torch.Tensor, need_x: bool, need_mix: bool
    ) -> Gradients:
        """Gradients of the branch w.r.t. its input x and its mixing matrix (M or the M_b)."""

    @abstractmethod
    def factor(self, M: torch.Tensor) -> torch.Tensor:
        """The small pre-image B that delta_W = D . B is assembled from."""

    @abstractmethod
    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        """dst (d_out, d_in) :=, += or -= delta_W, B from ``factor``."""

    @abstractmethod
    def lora_factors(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with delta_W = B @ A, B (d_out, r_hat) and A (r_hat, d_in); None when delta_W has no such form."""


class SquareBranch(MoRABranch):
    """delta(x) = D(M C(x)) with fixed 0/1 maps C and D: the summing types and truncation."""

    @property
    def period(self) -> int:
        return self.r_hat

    def mixing(self, M: torch.Tensor) -> torch.Tensor:
        return M

    def forward_add_(self, res: torch.Tensor, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        z = self.compression.apply(x)
        self.decompression.add_into(res, torch.mm(z, mix.t()))
        return z

    def backward(
        self, grad: torch.Tensor, saved: torch.Tensor, mix: torch.Tensor, need_x: bool, need_mix: bool
    ) -> Gradients:
        gz = self.decompression.adjoint(grad.to(mix.dtype))
        grad_mix = torch.mm(gz.t(), saved) if need_mix else None
        grad_x = self.compression.adjoint(torch.mm(gz, mix)) if need_x else None
        return grad_x, grad_mix

    def factor(self, M: torch.Tensor) -> torch.Tensor:
        """B = M C, shape (r_hat, d_in): rows of M pushed through C's adjoint, exactly as the backward pushes
        gradients, so delta_W and the forward agree by construction."""
        return self.compression.adjoint(M)

    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        self.decompression.rows_into(dst, B, mode)

    def lora_factors(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = M C (``factor``) and B = D, built by pushing the identity through the decompression, so the
        factors are the forward's own maps."""
        A = self.factor(M)
        eye = torch.eye(self.r_hat, dtype=A.dtype, device=A.device)
        D_t = torch.zeros(self.r_hat, self.d_out, dtype=A.dtype, device=A.device)
        self.decompression.add_into(D_t, eye)  # row k = D e_k
        return D_t.T.contiguous(), A.contiguous()


class ChunkedBranch(MoRABranch):
    """Type 6 and 'decouple': chunk b of the padded input meets its own M_b; outputs concatenated, tiled."""

    compression: WrapChunks
    decompression: Concatenate

    def __init__(self, compression: WrapChunks, decompression: Concatenate) -> None:
        super().__init__(compression, decompression)

    @property
    def period(self) -> int:
        return self.compression.padded

    def mixing(self, M: torch.Tensor) -> torch.Tensor:
        return self.compression.mixing(M)

    def forward_add_(self, res: torch.Tensor, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        T, d_out, r = x.shape[0], self.d_out, self.r_hat
        xc = self.compression.apply(x)
        if d_out <= self.period and res.dtype == xc.dtype:
            # Output i reads chunk i // r_hat, so only the first ceil(d_out / r_hat) chunks matter (fewer
            # than all of them for down-projections); their products go straight into res.
            k, part = divmod(d_out, r)
            if k:
                res[:, : k * r].view(T, k, r).transpose(0, 1).baddbmm_(
                    xc[:, :k].transpose(0, 1), mix[:k].transpose(1, 2)
                )
            if part:
                res[:, k * r :].addmm_(xc[:, k], mix[k, :part].t())
        else:
            out = xc.new_empty(xc.shape)
            # One batched matmul over chunks; the strided views keep the (T, chunk, r_hat) layout, so
            # `out` is already the concatenation of the chunk outputs (no permute copy).
            torch.bmm(xc.transpose(0, 1), mix.transpose(1, 2), out=out.transpose(0, 1))
            self.decompression.add_into(res, out)
        # The chunks are recomputed in backward (a view unless padding was needed) instead of kept.
        return x

    def backward(
        self, grad: torch.Tensor, saved: torch.Tensor, mix: torch.Tensor, need_x: bool, need_mix: bool
    ) -> Gradients:
        g = grad.to(mix.dtype)
        xc = self.compression.apply(saved) if need_mix else None
        if self.d_out > self.period:
            return self._backward_tiled(g, xc, mix, need_x)
        return self._backward_direct(g, xc, mix, need_x)

    def _backward_tiled(self, g: torch.Tensor, xc: torch.Tensor | None, mix: torch.Tensor, need_x: bool) -> Gradients:
        """d_out beyond one period: fold the tiles back onto it first."""
        grad_x = grad_mix = None
        gout = self.decompression.adjoint(g)  # (T, n_chunks, r_hat)
        if xc is not None:
            grad_mix = torch.bmm(gout.permute(1, 2, 0), xc.transpose(0, 1))
        if need_x:
            gxc = gout.new_empty(gout.shape)
            torch.bmm(gout.transpose(0, 1), mix, out=gxc.transpose(0, 1))
            grad_x = self.compression.adjoint(gxc)
        return grad_x, grad_mix

    def _backward_direct(self, g: torch.Tensor, xc: torch.Tensor | None, mix: torch.Tensor, need_x: bool) -> Gradients:
        """d_out within one period: chunk b's gradient is a strided view of g (zero for unread chunks)."""
        grad_x = grad_mix = None
        T, r, n_chunks = g.shape[0], self.r_hat, self.compression.n_chunks
        g = g.contiguous()
        k, part = divmod(self.d_out, r)
        gk, gpart = g[:, : k * r].view(T, k, r), g[:, k * r :]
        used = k + (1 if part else 0)
        if xc is not None:
            # Zeros: unread chunks and the unread rows of a partial chunk get no gradient (small tensor).
            grad_mix = mix.new_zeros(mix.shape)
            if k:
                torch.bmm(gk.permute(1, 2, 0), xc[:, :k].transpose(0, 1), out=grad_mix[:k])
            if part:
                torch.mm(gpart.t(), xc[:, k], out=grad_mix[k, :part])
        if need_x:
            gxc = g.new_empty(T, n_chunks, r)
            if k:
                torch.bmm(gk.transpose(0, 1), mix[:k], out=gxc[:, :k].transpose(0, 1))
            if part:
                gxc[:, k] = torch.mm(gpart, mix[k, :part])
            if used < n_chunks:
                gxc[:, used:].zero_()
            grad_x = self.compression.adjoint(gxc)
        return grad_x, grad_mix

    def factor(self, M: torch.Tensor) -> torch.Tensor:
        """The per-chunk blocks M_b, (n_chunks, r_hat, r_hat); the (n_chunks r_hat, d_in) block matrix is
        never built, ``rows_into`` writes its blocks straight into the destination."""
        return self.mixing(M)

    def rows_into(self, dst: torch.Tensor, B: torch.Tensor, mode: RowMode) -> None:
        if mode == "copy":
            dst.zero_()  # outside the diagonal blocks delta_W is zero
        sign = -1.0 if mode == "sub" else 1.0
        for view, rows in self.decompression.row_tiles(dst):
            self.compression.add_block_rows(view, B, rows, sign)

    def lora_factors(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """None: M on every chunk makes delta_W block-structured, not D M C."""
        return None


def build_branch(compression: Compression, decompression_type: type[Decompression], d_out: int) -> MoRABranch:
    """The branch of ``compression`` followed by a ``decompression_type`` onto d_out outputs."""
    decompression = decompression_type.after(compression, d_out)
    if isinstance(compression, WrapChunks) and isinstance(decompression, Concatenate):
        return ChunkedBranch(compression, decompression)
    if isinstance(compression, WrapChunks) or isinstance(decompression, Concatenate):
        raise TypeError("chunks (WrapChunks, RopeChunks) go with Concatenate and only with it")
    return SquareBranch(compression, decompression)


class _AddBranch(torch.autograd.Function):
    """result += delta(x), in place on the frozen layer's fresh 2-D output; hand-written backward that passes
    the output gradient straight through."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, mix: torch.Tensor, branch: MoRABranch) -> torch.Tensor:
        saved = branch.forward_add_(result, x, mix)
        ctx.mark_dirty(result)
        ctx.branch = branch
        ctx.save_for_backward(saved, mix)
        ctx.x_dtype = x.dtype
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, mix = ctx.saved_tensors
        grad_x, grad_mix = ctx.branch.backward(grad, saved, mix, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return grad, grad_x, grad_mix, None


def add_branch_(result: torch.Tensor, x: torch.Tensor, mix: torch.Tensor, branch: MoRABranch) -> torch.Tensor:
    """result += delta(x) in place, differentiable in x and mix (result must be a fresh, non-view tensor)."""
    out: torch.Tensor = _AddBranch.apply(result, x, mix, branch)
    return out

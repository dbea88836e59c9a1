"""MoRA: high-rank updating with one square matrix (arXiv 2405.12130).

For a frozen ``nn.Linear`` ``W`` (d_out x d_in) the adapter adds

    delta(x) = f_decomp(M . f_comp(x)),    M: (r_hat x r_hat), zero-initialised, scale 1,

with ``r_hat = floor(sqrt((d_in + d_out) * rank) + 0.5)`` so that MoRA trains as many
parameters as LoRA of the same rank. The code is in four parts:

* ``types``: the type names and official numbers, each type's (compression, decompression) pair,
  r_hat, and the only two shapes refused (see ``mora_shape_problem``);
* ``operators``: the compressions and decompressions, each with its adjoint beside it;
* ``branch``: a pair composed with M: forward added in place into the frozen layer's output,
  hand-written backward, and delta_W = D . B from a small pre-image B;
* here, ``MoRALinear``: the module (forward, type switch, delta_W, LoRA factors) and its in-place
  ``apply_delta_``, under which the layer protocol (adapters/layer.py) merges, unmerges and folds.

Shapes the official code (GitHub kongds/MoRA) cannot run are generalised: the wrap-around
padding is cyclic (padded feature ``j`` is ``x[j mod d_in]``), so ``r_hat >= d_in`` and
``r_hat > 2 d_in`` work for the sharing/RoPE types, and the type-6 delta weight is defined
for a single chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from mora_train.adapters.layer import RestartableLayer, Sign
from mora_train.adapters.mora.branch import MoRABranch, add_branch_, build_branch
from mora_train.adapters.mora.types import (
    AUTO,
    AUTO_SHARING_FROM_RANK,
    MORA_OPERATORS,
    MORA_TYPE_DESCRIPTIONS,
    MORA_TYPES,
    choose_mora_type,
    mora_shape_problem,
    mora_square_side,
    resolve_mora_type,
)

__all__ = [
    "AUTO",
    "AUTO_SHARING_FROM_RANK",
    "MORA_OPERATORS",
    "MORA_TYPES",
    "MORA_TYPE_DESCRIPTIONS",
    "MoRALinear",
    "choose_mora_type",
    "mora_shape_problem",
    "mora_square_side",
    "resolve_mora_type",
]


def _branch(kind: str, d_in: int, d_out: int, r_hat: int) -> MoRABranch:
    compression_type, decompression_type = MORA_OPERATORS[kind]
    return build_branch(compression_type(d_in, r_hat), decompression_type, d_out)


class MoRALinear(RestartableLayer, nn.Module):
    """A frozen ``nn.Linear`` plus the MoRA update ``f_decomp(M f_comp(dropout(x)))``.

    Merge, unmerge and fold come from the layer protocol (adapters/layer.py) over ``apply_delta_``, which
    adds delta_W's rows into W in place without building delta_W.
    """

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
        self._branch = _branch(kind, d_in, d_out, self.r_hat)

    # -- proxies so code reading `layer.weight` keeps working on a wrapped model --------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def frozen_linear(self) -> nn.Linear:
        return self.base_layer

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"mora_M": self.mora_M}

    def size_label(self) -> str:
        return f"r̂={self.r_hat}"

    def label(self) -> str:
        return f"MoRA layer '{self.layer_name or '<unnamed layer>'}'"

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        self.mora_M.zero_()  # MoRA starts from M = 0 (ΔW = 0); nothing random to draw

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
        mix = self._branch.mixing(self.mora_M.to(dtype))
        if autocast:
            # Inputs are already cast; keep autocast from re-casting inside the hand-written passes.
            with torch.autocast(device_type=device_type, enabled=False):
                result = add_branch_(result, xd, mix, self._branch)
        else:
            result = add_branch_(result, xd, mix, self._branch)
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
        self._branch = _branch(kind, self.in_features, self.out_features, self.r_hat)

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
                f"{self.label()}: out must be a {self.out_features} x "
                f"{self.in_features} {M.dtype} tensor on {M.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}."
            )
        self._branch.rows_into(out, self._branch.factor(M), "copy")
        return out

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with delta_W = B @ A exactly, B (d_out, r_hat) and A (r_hat, d_in), float32 — or None.

        For the summing types and truncation delta_W = D M C with fixed 0/1 maps C (compression) and
        D (decompression): A = M C (what ``factor`` computes) and B = D, built by pushing the identity
        through the decompression, so the factors are the forward's own maps. The chunked types
        (rope, decouple) apply M to every chunk: delta_W is block-structured, not of this form (None).
        """
        return self._branch.lora_factors(self.mora_M.detach().to(self._math_dtype()))

    @torch.no_grad()
    def apply_delta_(self, sign: Sign) -> None:
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            # Adding ΔW to 4-/8-bit codes would re-quantize it away; the adapter's merge_and_unload de-quantizes.
            raise ValueError(
                f"{self.label()}: its base weight is quantized ({weight.dtype}); "
                "merge through the adapter (merge_and_unload de-quantizes the base first), not into the codes"
            )
        branch = self._branch
        factor = branch.factor(self.mora_M.detach().to(self._math_dtype()))
        # Only rows of the factor that reach delta_W matter (r_hat may exceed d_out).
        used = factor.reshape(-1, factor.shape[-1])[: min(self.out_features, branch.period)]
        if not torch.isfinite(used).all():
            raise ValueError(
                f"{self.label()}: delta weight has non-finite values "
                f"(NaN/Inf in mora_M); refusing to {'merge' if sign == 'add' else 'unmerge'}."
            )
        if weight.dtype == factor.dtype:
            # Straight into W with broadcasting: no d_out x d_in temporary.
            branch.rows_into(weight.data, factor.to(weight.device), sign)
            return
        updated = weight.data.to(factor.dtype)
        branch.rows_into(updated, factor.to(weight.device), sign)
        updated = updated.to(weight.dtype)
        if not torch.isfinite(updated).all():
            raise ValueError(f"{self.label()}: merged weight overflows {weight.dtype}.")
        weight.data.copy_(updated)

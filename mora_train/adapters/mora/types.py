"""MoRA's types: their names and official numbers, their operator pairs, r_hat, and the shapes each refuses.

r_hat = floor(sqrt((d_in + d_out) * rank) + 0.5), so that MoRA trains as many parameters as LoRA of the
same rank. The operator table (names and official numbers) is in docs/adapters.md.
"""

from __future__ import annotations

import math
from numbers import Integral

from mora_train.adapters.mora.operators import (
    Compression,
    Concatenate,
    Decompression,
    GroupSum,
    Repeat,
    RopeChunks,
    Tile,
    Truncate,
    WrapChunks,
    WrapSum,
    ZeroPad,
)

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

# The operator pair of each canonical type: delta(x) = decompression(M . compression(x)).
MORA_OPERATORS: dict[str, tuple[type[Compression], type[Decompression]]] = {
    "sharing": (WrapSum, Tile),
    "grouping": (GroupSum, Repeat),
    "group_tile": (GroupSum, Tile),
    "share_group": (WrapSum, Repeat),
    "rope": (RopeChunks, Concatenate),
    "decouple": (WrapChunks, Concatenate),
    "truncation": (Truncate, ZeroPad),
}


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

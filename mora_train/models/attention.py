"""Which attention implementation a loaded model runs, and whether it keeps packed examples apart.

Packed rows (data/packing.py) carry position ids that restart at 0 at each example and no attention mask.
transformers turns the restarts into a block-diagonal causal mask for eager and sdpa (masking_utils.
create_causal_mask -> find_packed_sequence_indices, used by the models that build their mask through it) and
into variable-length flash attention for flash_attention_2 over a batch of one row (modeling_flash_attention_
utils._is_packed_sequence). Anything else (flex attention, a kernel from the Hub, a model's own code) may let
examples attend to each other, which packing must not do silently.
"""

from __future__ import annotations

import torch
from torch import nn

# Implementations whose packed-sequence path transformers implements from position ids.
MASKED_FROM_POSITIONS = ("eager", "sdpa")
VARLEN_FROM_POSITIONS = ("flash_attention_2",)

# The probe: two short examples in one row; the second must see exactly what it sees alone.
PROBE_LENGTH = 5


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the model's config resolved to (eager where a model names none)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def flattens_packed_rows(model: nn.Module) -> bool:
    """Flash attention separates packed sequences only within one row: the collator puts the rows end to end."""
    return attn_implementation(model) in VARLEN_FROM_POSITIONS


def _probe_ids(model: nn.Module, device: torch.device) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    return (torch.arange(3, 3 + 2 * PROBE_LENGTH, device=device) * 7919 % vocab).unsqueeze(0)


@torch.no_grad()
def keeps_packed_examples_apart(model: nn.Module) -> bool:
    """One forward pass of two packed examples: the second one's logits must equal its logits alone.

    A model whose attention ignores the packed positions gives the second example the first one's context,
    which moves its logits far beyond rounding (a random tiny model's by about 1e-1 of their scale)."""
    device = next(model.parameters()).device
    ids = _probe_ids(model, device)
    positions = torch.arange(PROBE_LENGTH, device=device).repeat(2).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, PROBE_LENGTH:].float()
        alone = model(input_ids=ids[:, PROBE_LENGTH:], use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    scale = max(float(alone.abs().max()), 1.0)
    exact = next(model.parameters()).dtype in (torch.float32, torch.float64)
    return float((packed - alone).abs().max()) <= (1e-4 if exact else 3e-2) * scale


def packing_problem(model: nn.Module) -> str | None:
    """Why packed examples could attend to each other in this model (None: they cannot)."""
    implementation = attn_implementation(model)
    fix = (
        "set model.attn_implementation=sdpa (or eager, or flash_attention_2 on a GPU), or train unpacked "
        "with trainer.packing=false"
    )
    if implementation not in MASKED_FROM_POSITIONS + VARLEN_FROM_POSITIONS:
        return (
            f"`trainer.packing=true` cannot keep packed examples apart with this model's attention implementation "
            f"{implementation!r}: transformers separates them by their position ids only with eager, sdpa and "
            f"flash_attention_2 attention; {fix}"
        )
    if not type(model).__module__.startswith("transformers."):
        return (
            f"`trainer.packing=true` cannot be checked on {type(model).__name__}, a model class from outside "
            "transformers (its own code may ignore packed position ids and let examples attend to each other); "
            "train it unpacked with trainer.packing=false"
        )
    if implementation in MASKED_FROM_POSITIONS and not keeps_packed_examples_apart(model):
        return (
            f"`trainer.packing=true`: {type(model).__name__} with model.attn_implementation={implementation} lets "
            "packed examples attend to each other (its forward pass does not build its attention mask from "
            "packed position ids: checked on two packed examples); train it unpacked with trainer.packing=false"
        )
    return None

"""The fixed inputs every export is checked on, and the logits a model computes on them."""

from __future__ import annotations

import torch

from mora_train.data.common import PadCollator
from mora_train.models.quantization import training_kernels

# Token ids below this are left out of a random probe: the special tokens (pad, bos, eos) of most tokenizers.
FIRST_ORDINARY_TOKEN = 3


def probe_batch(examples: list[dict], pad_token_id: int, size: int = 4) -> dict[str, torch.Tensor]:
    """A fixed small batch (the first training examples) to compare logits on."""
    # Only ids and labels: packed examples' position ids would switch the collator to its mask-free layout.
    batch = PadCollator(pad_token_id)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[:size]])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def random_probe_ids(vocab_size: int, rows: int = 2, length: int = 16) -> torch.Tensor:
    """Token ids for a model whose data is not at hand (an adapter folder): seeded, so every export of the
    same model is checked on the same ids."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(
        FIRST_ORDINARY_TOKEN, max(FIRST_ORDINARY_TOKEN + 1, vocab_size), (rows, length), generator=generator
    )


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of the real (unpadded) tokens; with `dtype`, computed in that dtype and the model restored after."""
    model.eval()
    return _forward_logits(model, batch, dtype)


@torch.no_grad()
def quantized_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the real tokens as training computed them: eval mode, but the quantized layers' training kernels
    (models.quantization.training_kernels: on CPU, int8 evaluates with int8 activations but trained without)."""
    model.eval()
    with training_kernels(model):
        return _forward_logits(model, batch)


def _forward_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> torch.Tensor:
    first = next(model.parameters())
    original = first.dtype
    if dtype is not None and dtype != original:
        model.to(dtype)  # fp32 -> fp64 -> fp32 is exact, so the model comes back unchanged
    try:
        out = model(**{k: v.to(first.device) for k, v in batch.items()})
    finally:
        if dtype is not None and dtype != original:
            model.to(original)
    mask = batch["attention_mask"].to(first.device).bool()
    return out.logits.to(torch.float64)[mask]

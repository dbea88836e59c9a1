"""Token-level loss and perplexity of a model on tokenized examples (held-out text, held-out responses)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

IGNORE_INDEX = -100  # label value no loss counts (the convention of torch, transformers and mora_train.data)


@torch.no_grad()
def token_nll(
    model: PreTrainedModel,
    examples: list[dict],
    collate: Callable[[list[dict]], dict[str, Any]],
    batch_size: int = 4,
    desc: str = "held-out loss",
) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods over labelled tokens, number of those tokens).

    `collate` batches examples into model inputs + `labels`: the task passes the training collator,
    so packed blocks keep their per-document attention here too.
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = collate(examples[start : start + batch_size])
        labels = batch.pop("labels").to(device)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = model(**inputs).logits
        # Position t predicts token t+1 (the shift transformers' own loss makes).
        shifted = labels[:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((shifted != IGNORE_INDEX).sum())
    return total, count


def loss_metrics(total: float, count: int, prefix: str = "eval") -> dict[str, float]:
    loss = total / count if count else float("nan")
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0)), f"{prefix}_tokens": count}

"""Batched greedy generation, shared by the generation-based evaluations."""

from __future__ import annotations

from typing import cast

import torch
from tqdm.auto import tqdm
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    desc: str = "generating",
    stop_strings: list[str] | None = None,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of each prompt (special tokens stripped), prompts left-padded in batches.

    `stop_strings` end a sequence's generation early (the text may still run past them within the
    token that completes them: cut afterwards); `add_special_tokens=False` for prompts that already
    hold them (rendered chat templates).
    """
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        encoded = [
            tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        longest = max(len(ids) for ids in encoded)
        # Left padding keeps every prompt's last token at the same position, where generation continues.
        input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        # PreTrainedModel itself has no generate(): the causal LMs evaluated here also subclass GenerationMixin.
        generated = cast(GenerationMixin, model).generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}),
        )
        new_tokens = generated[:, longest:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs

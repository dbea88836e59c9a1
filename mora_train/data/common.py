"""Tokenisation and batching shared by the task recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_seq_len: int
) -> dict[str, list[int]]:
    """Token ids for prompt+completion+EOS with labels only on the completion (and EOS, so the model stops).

    Prompt and completion are tokenised separately, exactly as generation will see the prompt.
    Sequences over max_seq_len are cut from the end.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class PadCollator:
    """Right-pads a list of {input_ids, labels} to the longest in the batch."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention = [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
        }


def count_tokens(dataset: list[dict[str, Any]]) -> int:
    return sum(len(example["input_ids"]) for example in dataset)

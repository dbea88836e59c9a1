"""Tokenisation and batching shared by the task recipes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mora_train.core.errors import MoraTrainError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


# A pathological record (one 50 MB line) must cost about what reading it costs, not what tokenizing all of
# it costs (~3 µs per character with a byte-level BPE: 150 s for 50 MB), when at most max_seq_len tokens of
# it can be used: tokenize_capped tokenizes a prefix, growing it until it yields more tokens than needed.
CAP_CHARS_PER_TOKEN = 16
CAP_MARGIN_TOKENS = 16  # tokens near the cut may differ from the whole text's: never among those kept


def tokenize_capped(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, add_special_tokens: bool = False
) -> list[int]:
    """The token ids of `text`, exact up to the first `max_tokens` (more may follow; the caller cuts).

    Texts short enough are tokenized whole. Longer ones: a prefix of CAP_CHARS_PER_TOKEN characters per
    needed token, grown 4x until it gives max_tokens + CAP_MARGIN_TOKENS tokens (tokenization is local, so
    the tokens well before the cut are those of the whole text); the cost follows max_tokens, not len(text).
    """
    need = max_tokens + CAP_MARGIN_TOKENS
    limit = need * CAP_CHARS_PER_TOKEN
    while len(text) > limit:
        ids = tokenizer(text[:limit], add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) >= need:
            return ids[:need]
        limit *= 4
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_seq_len: int
) -> dict[str, list[int]]:
    """Token ids for prompt+completion+EOS with labels only on the completion (and EOS, so the model stops).

    Prompt and completion are tokenised separately, exactly as generation will see the prompt.
    Sequences over max_seq_len are cut from the end.
    """
    prompt_ids = tokenize_capped(tokenizer, prompt, max_seq_len, add_special_tokens=True)
    completion_ids = [*tokenize_capped(tokenizer, completion, max_seq_len), tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class LengthReport:
    """What happened to examples longer than max_seq_len (logged, and kept in metrics)."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long under too_long=drop, or nothing left to learn after truncation

    def as_dict(self) -> dict[str, int]:
        return {"examples_read": self.total, "truncated": self.truncated, "dropped": self.dropped}


def fit_to_length(
    input_ids: list[int], labels: list[int], max_seq_len: int, too_long: str, report: LengthReport
) -> dict[str, list[int]] | None:
    """Apply the too_long policy: cut from the end (`truncate`) or skip (`drop`) an over-long example.

    An example whose learned tokens are all cut off is dropped under either policy: it would add nothing
    but a zero-loss batch slot.
    """
    report.total += 1
    if len(input_ids) > max_seq_len:
        if too_long == "drop":
            report.dropped += 1
            return None
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        report.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            report.truncated -= 1
            report.dropped += 1
            return None
    return {"input_ids": input_ids, "labels": labels}


def log_length_report(name: str, report: LengthReport, max_seq_len: int) -> None:
    if report.truncated or report.dropped:
        log.warning(
            "%s: of %d examples, %d were longer than max_seq_len=%d tokens and were truncated, %d were dropped "
            "(too long under task.too_long=drop, or no response tokens left after truncation)",
            name,
            report.total,
            report.truncated,
            max_seq_len,
            report.dropped,
        )
    else:
        log.info("%s: %d examples, none longer than max_seq_len=%d", name, report.total, max_seq_len)


def require_examples(examples: Sequence[Any], key: str, report: LengthReport, max_seq_len: int, too_long: str) -> None:
    """An empty dataset after filtering is a user error, never a silent zero-step run.

    `too_long` is the policy the examples went through: it decides why they were dropped, hence the fix."""
    if examples:
        return
    if report.dropped and too_long == "drop":
        raise MoraTrainError(
            f"`{key}`: no examples left: all {report.total} were dropped as longer than max_seq_len={max_seq_len} "
            "tokens (task.too_long=drop); raise trainer.max_seq_len or set task.too_long=truncate"
        )
    if report.dropped:
        raise MoraTrainError(
            f"`{key}`: no examples left: all {report.total} were longer than max_seq_len={max_seq_len} tokens, and "
            "cut to that length none kept a response token to learn from (the prompt alone fills it); raise "
            "trainer.max_seq_len or shorten the prompts"
        )
    raise MoraTrainError(f"`{key}`: the dataset is empty; check the files/split and any filters")


class _PackedTokenCountFilter(logging.Filter):
    """Drops the Trainer's per-step warning that a batch without attention mask has its tokens counted whole.

    Packed blocks are full (all but the last), so counting every token is the right count for them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Could not determine method to count non-padding tokens")


_TOKEN_COUNT_FILTER = _PackedTokenCountFilter()


@dataclass
class PadCollator:
    """Right-pads a list of {input_ids, labels} to the longest in the batch.

    Packed examples (with `position_ids`, restarting at 0 for each document) get their position ids and no
    attention mask: transformers then builds a block-diagonal causal mask (eager, sdpa), so documents packed
    into one block do not attend to each other. Right padding needs no mask under causal attention (real tokens
    never look ahead), and `use_cache=False` is needed because the packed-mask path only runs without a cache.
    `flatten` (flash attention): packed rows are put end to end in one row instead, with no padding at all;
    flash attention keeps sequences apart by their position ids only in a batch of one row.
    """

    pad_token_id: int
    flatten: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        packed = "position_ids" in features[0]
        if packed and self.flatten:
            features = [{key: [v for f in features for v in f[key]] for key in ("input_ids", "labels", "position_ids")}]
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention, positions = [], [], [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            attention.append([1] * len(f["input_ids"]) + [0] * pad)
            if packed:
                positions.append(list(f["position_ids"]) + list(range(pad)))  # padding: a segment of its own
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            logging.getLogger("transformers.trainer").addFilter(_TOKEN_COUNT_FILTER)  # idempotent
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor(attention, dtype=torch.long)
        return batch


def count_tokens(dataset: list[dict[str, Any]]) -> int:
    return sum(len(example["input_ids"]) for example in dataset)

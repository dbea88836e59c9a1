"""Packed SFT (trainer.packing=true): tokenized examples packed whole into rows of up to max_seq_len tokens.

A row is its examples' tokens end to end, with no padding between them; `position_ids` restart at 0 at each
example, and each example's first label is IGNORE_INDEX, so no token learns to predict the next example.
transformers reads the restarts as packed sequences: eager and sdpa get a block-diagonal causal mask
(masking_utils.find_packed_sequence_indices, when the batch has no attention mask and no cache), and
flash_attention_2 runs its variable-length kernel over one flattened row (PadCollator(flatten=True)). So an
example attends to itself only, and its per-token losses are those it has alone (tests/unit/test_packing.py).

Rows are filled best-fit decreasing (longest example first, each into the fullest row it fits), which leaves
little room unused; the Trainer shuffles the rows. trainer.batch_size and micro_batch_size count rows.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mora_train.data.common import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingReport:
    examples: int
    rows: int
    tokens: int
    row_tokens: int  # max_seq_len: a row's capacity

    @property
    def fill(self) -> float:
        """The share of the rows' capacity that holds tokens."""
        return self.tokens / max(self.rows * self.row_tokens, 1)


def is_packed(examples: Sequence[dict[str, Any]]) -> bool:
    """Whether the examples are packed rows already (continual pretraining's blocks carry position ids). A stream
    (task.data.streaming: an iterable dataset with no len) only ever holds packed pretraining blocks."""
    if not hasattr(examples, "__len__"):
        return True
    return len(examples) > 0 and "position_ids" in examples[0]


def best_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= capacity, best-fit decreasing.

    The free room of the open rows is kept as a sorted list of distinct sizes, each with its rows, so finding
    the fullest row an example fits costs a bisection; ties go to the earliest example. A length over the
    capacity gets a row of its own."""
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted, distinct
    rows_by_free: dict[int, list[int]] = {}
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        slot = bisect_left(free_sizes, size)
        if slot == len(free_sizes):
            row, free = len(rows), capacity - size
            rows.append([index])
        else:
            room = free_sizes[slot]
            waiting = rows_by_free[room]
            row, free = waiting.pop(), room - size
            if not waiting:
                del rows_by_free[room]
                free_sizes.pop(slot)
            rows[row].append(index)
        if free > 0:
            if free not in rows_by_free:
                insort(free_sizes, free)
                rows_by_free[free] = []
            rows_by_free[free].append(row)
    return rows


def pack_examples(
    examples: Sequence[dict[str, Any]], max_seq_len: int
) -> tuple[list[dict[str, list[int]]], PackingReport]:
    """Rows of whole examples ({input_ids, labels} each), with position ids restarting at each example."""
    rows = []
    for members in best_fit_rows([len(e["input_ids"]) for e in examples], max_seq_len):
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in members:
            example = examples[index]
            input_ids += example["input_ids"]
            # Never used unpacked (the loss shifts labels left); packed, it would be the previous example's target.
            labels += [IGNORE_INDEX, *example["labels"][1:]]
            positions += range(len(example["input_ids"]))
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    tokens = sum(len(row["input_ids"]) for row in rows)
    return rows, PackingReport(len(examples), len(rows), tokens, max_seq_len)


def training_rows(examples: Sequence[dict[str, Any]], max_seq_len: int, packing: bool) -> Sequence[dict[str, Any]]:
    """What the Trainer iterates over: the examples as they are (a list, a dataset, or a stream, which is never
    read ahead here), or (trainer.packing) the rows they pack into."""
    if not packing or is_packed(examples):
        return examples
    rows, report = pack_examples(examples, max_seq_len)
    log.info(
        "trainer.packing: %d examples (%d tokens) packed into %d rows of up to %d tokens (%.1f%% full); "
        "trainer.batch_size counts rows",
        report.examples,
        report.tokens,
        report.rows,
        max_seq_len,
        100.0 * report.fill,
    )
    return rows

"""Multiple-choice benchmark records (PubMedQA, MedQA, MMLU, financial sentiment, ...): reading and rendering.

A benchmark is a `BenchmarkSettings` section (data/config.py; see configs/task/biomed.yaml): its data source,
prompt and choice templates, the label field and the label of each choice, and how many records to use.
This module reads the records into MCExample (prompt and choices rendered, gold resolved);
evaluation/multiple_choice.py scores them by option log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mora_train.core.errors import MoraTrainError
from mora_train.data.config import BenchmarkSettings
from mora_train.data.sources import load_records, lookup, render


@dataclass
class MCExample:
    prompt: str
    choices: list[str]
    gold: int
    where: str


def load_benchmark(bench: BenchmarkSettings, key: str) -> list[MCExample]:
    """The benchmark's examples (max_samples of them), prompt and choices rendered, gold resolved."""
    records = load_records(bench.data, f"{key}.data")
    limit = bench.max_samples
    if limit and limit < len(records):
        if bench.sample_seed is None:
            records = records[:limit]
        else:
            chosen = torch.randperm(len(records), generator=torch.Generator().manual_seed(bench.sample_seed))[:limit]
            records = [records[i] for i in sorted(chosen.tolist())]
    labels = [str(label) for label in bench.labels]
    examples = []
    for record in records:
        label = str(lookup(record, bench.label_field, f"{key}.label_field"))
        if label not in labels:
            raise MoraTrainError(
                f"{record.where}: label {label!r} (field '{bench.label_field}') is not one of `{key}.labels` {labels}"
            )
        examples.append(
            MCExample(
                prompt=render(bench.prompt, record, f"{key}.prompt"),
                choices=[render(c, record, f"{key}.choices") for c in bench.choices],
                gold=labels.index(label),
                where=record.where,
            )
        )
    return examples

"""Multiple-choice benchmark records (PubMedQA, MedQA, MMLU, financial sentiment, ...): config checks and reading.

A benchmark is a config (see configs/task/biomed.yaml):

    data:   a source (path/hub, filters, limit), as for task.data.train
    prompt: "Question: {question}\\nA. {A}\\n...\\nAnswer:"      # a template over the record's fields
    choices: [" A", " B", " C", " D"]    # one continuation per option, templates too: [" {A}", " {B}", ...]
    label_field: answer                  # the record field holding the gold label
    labels: [A, B, C, D]                 # the label value of each choice, in order (compared as strings)
    score: sum                           # sum of the option's token log-probs, or `mean` (per token)
    max_samples: 200                     # first N records; null = all
    sample_seed: 0                       # optional: N records drawn at random with this seed (file order kept),
                                         # for files grouped by label or subject, where a prefix is not a sample

This module reads the records into MCExample (prompt and choices rendered, gold resolved);
evaluation/multiple_choice.py scores them by option log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from mora_train.core.errors import MoraTrainError
from mora_train.data.sources import as_plain, load_records, lookup, render, source_problems, template_fields

SCORES = ("sum", "mean")
BENCHMARK_KEYS = ("data", "prompt", "choices", "label_field", "labels", "score", "max_samples", "sample_seed")


@dataclass
class MCExample:
    prompt: str
    choices: list[str]
    gold: int
    where: str


def benchmark_problems(bench: Any, key: str) -> list[str]:
    if not isinstance(bench, DictConfig):
        return [f"`{key}` must be a mapping with data, prompt, choices, label_field, labels"]
    problems = []
    unknown = sorted(set(bench) - set(BENCHMARK_KEYS))
    if unknown:
        problems.append(f"`{key}` has unknown keys {unknown}; known keys: {', '.join(BENCHMARK_KEYS)}")
    problems += source_problems(bench.get("data"), f"{key}.data")
    prompt, choices, labels = bench.get("prompt"), as_plain(bench.get("choices")), as_plain(bench.get("labels"))
    if not isinstance(prompt, str):
        problems.append(f"`{key}.prompt` must be a template string, got {prompt!r}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        problems.append(f"`{key}.choices` must be a list of at least two non-empty strings, got {choices!r}")
    if not isinstance(labels, list) or (isinstance(choices, list) and len(labels) != len(choices)):
        problems.append(f"`{key}.labels` must be a list with one label per choice, got {labels!r}")
    if not isinstance(bench.get("label_field"), str):
        problems.append(f"`{key}.label_field` must name the record field with the gold label")
    if bench.get("score", "sum") not in SCORES:
        problems.append(f"`{key}.score={bench.get('score')}` must be one of {', '.join(SCORES)}")
    limit = bench.get("max_samples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        problems.append(f"`{key}.max_samples={limit}` must be a positive integer or null (all)")
    seed = bench.get("sample_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        problems.append(f"`{key}.sample_seed={seed}` must be an integer (a random sample of max_samples records) "
                        "or null (the first max_samples records)")
    for name, template in [("prompt", prompt), *((f"choices[{i}]", c) for i, c in enumerate(choices or []))]:
        if isinstance(template, str):
            try:
                template_fields(template)
            except ValueError as err:
                problems.append(f"`{key}.{name}={template!r}` is not a valid template ({err}); write braces as {{{{ }}}}")
    return problems


def load_benchmark(bench: DictConfig, key: str) -> list[MCExample]:
    """The benchmark's examples (max_samples of them), prompt and choices rendered, gold resolved."""
    records = load_records(bench.data, f"{key}.data")
    limit = bench.get("max_samples")
    if limit and limit < len(records):
        if bench.get("sample_seed") is None:
            records = records[:limit]
        else:
            chosen = torch.randperm(len(records), generator=torch.Generator().manual_seed(bench.sample_seed))[:limit]
            records = [records[i] for i in sorted(chosen.tolist())]
    labels = [str(label) for label in as_plain(bench.labels)]
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
                choices=[render(c, record, f"{key}.choices") for c in as_plain(bench.choices)],
                gold=labels.index(label),
                where=record.where,
            )
        )
    return examples

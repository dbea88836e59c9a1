"""Zero-shot multiple choice by option log-likelihood (PubMedQA, MedQA, MMLU, financial sentiment, ...).

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

Each choice is scored as log p(choice tokens | prompt); the prediction is the best-scoring choice.
Prompt and choice are tokenized separately (the prompt with the tokenizer's special tokens), and a
prompt too long for `task.eval.max_len` (or the model's context) loses tokens from its start.
Inputs shared by several choices (every single-token choice of one prompt) are run once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data.sources import as_plain, load_records, lookup, render, source_problems, template_fields
from mora_train.core.errors import MoraTrainError

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


def model_context(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[MCExample],
    batch_size: int,
    max_len: int,
    desc: str = "scoring",
) -> tuple[list[list[tuple[float, int]]], int]:
    """For each example and choice: (log p(choice | prompt), number of choice tokens); and how many prompts were cut."""
    model.eval()
    device = next(model.parameters()).device
    limit = min(max_len, model_context(model) or max_len)
    sequences: dict[tuple[int, ...], int] = {}  # distinct model inputs -> index
    requests: list[tuple[int, int, int, list[int]]] = []  # (example, choice, input index, choice ids)
    truncated = 0
    for e, example in enumerate(examples):
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        cut = False
        for c, choice in enumerate(example.choices):
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not choice_ids:
                raise MoraTrainError(f"{example.where}: choice {choice!r} has no tokens; check the benchmark's choices")
            # The input is prompt + choice minus its last token (predicted, never fed); it must fit `limit`.
            keep = max(limit - (len(choice_ids) - 1), 1)
            ids = prompt_ids
            if len(prompt_ids) > keep:
                ids, cut = prompt_ids[-keep:], True
            seq = tuple(ids + choice_ids[:-1])
            index = sequences.setdefault(seq, len(sequences))
            requests.append((e, c, index, choice_ids))
        truncated += cut
    # Which positions of each input we need log-probs at, and for which token.
    inputs = list(sequences)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths share a batch
    logprob_of: dict[tuple[int, int, int], float] = {}  # (input index, position, token) -> log-prob
    wanted: dict[int, list[tuple[int, int]]] = {}  # input index -> [(position, token)]
    for _, _, index, choice_ids in requests:
        start = len(inputs[index]) - len(choice_ids)  # position whose logits predict the first choice token
        wanted.setdefault(index, []).extend((start + j, t) for j, t in enumerate(choice_ids))
    pad = tokenizer.pad_token_id
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = order[b : b + batch_size]
        longest = max(len(inputs[i]) for i in batch)
        ids = torch.tensor([list(inputs[i]) + [pad] * (longest - len(inputs[i])) for i in batch], device=device)
        mask = torch.tensor([[1] * len(inputs[i]) + [0] * (longest - len(inputs[i])) for i in batch], device=device)
        positions = sorted({p for i in batch for p, _ in wanted[i]})
        keep = torch.tensor(positions, device=device)
        try:  # only the logits we need: a full (batch, length, vocabulary) tensor is GBs for long prompts
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
        except TypeError:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, keep]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        column = {p: k for k, p in enumerate(positions)}
        for row, i in enumerate(batch):
            for p, t in wanted[i]:
                logprob_of[(i, p, t)] = logprobs[row, column[p], t].item()
    scores: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(ex.choices) for ex in examples]
    for e, c, index, choice_ids in requests:
        start = len(inputs[index]) - len(choice_ids)
        total = sum(logprob_of[(index, start + j, t)] for j, t in enumerate(choice_ids))
        scores[e][c] = (total, len(choice_ids))
    return scores, truncated


def evaluate_benchmark(
    name: str,
    bench: DictConfig,
    examples: list[MCExample],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_len: int,
    predictions_file: Any,
) -> dict[str, float]:
    started = time.time()
    scores, truncated = score_choices(model, tokenizer, examples, batch_size, max_len, f"{name} eval")
    by_mean = bench.get("score", "sum") == "mean"
    correct = 0
    for example, choice_scores in zip(examples, scores):
        values = [total / n if by_mean else total for total, n in choice_scores]
        predicted = max(range(len(values)), key=lambda i: values[i])
        correct += predicted == example.gold
        predictions_file.write(json.dumps({
            "benchmark": name,
            "source": example.where,
            "gold": example.gold,
            "predicted": predicted,
            "correct": predicted == example.gold,
            "scores": [v if math.isfinite(v) else None for v in values],
        }) + "\n")
    return {
        f"{name}_accuracy": correct / len(examples),
        f"{name}_samples": len(examples),
        f"{name}_prompts_truncated": truncated,
        f"{name}_runtime_s": time.time() - started,
    }


def evaluate_benchmarks(
    benchmarks: dict[str, list[MCExample]],
    configs: DictConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_len: int,
    run_dir: Path,
) -> dict[str, float]:
    """Every benchmark's accuracy (+ samples, truncated prompts, runtime); per-example scores to benchmark_predictions.jsonl."""
    metrics: dict[str, float] = {}
    with open(Path(run_dir) / "benchmark_predictions.jsonl", "w") as f:
        for name, examples in benchmarks.items():
            metrics.update(evaluate_benchmark(name, configs[name], examples, model, tokenizer, batch_size, max_len, f))
    accuracies = [metrics[f"{name}_accuracy"] for name in benchmarks]
    # NaN when no benchmark is selected (task.eval.benchmarks=[]), so the key is always there for sweeps.
    metrics["benchmark_mean_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else float("nan")
    return metrics

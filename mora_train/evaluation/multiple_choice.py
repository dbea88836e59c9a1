"""Zero-shot multiple choice by option log-likelihood (PubMedQA, MedQA, MMLU, financial sentiment, ...).

The benchmarks' configs and records are read by data/benchmarks.py; here each example (anything
with prompt, choices, gold and where, such as data.benchmarks.MCExample) is scored.
Each choice is scored as log p(choice tokens | prompt); the prediction is the best-scoring choice
(`score: sum` of the option's token log-probs, or `mean` per token).
Prompt and choice are tokenized separately (the prompt with the tokenizer's special tokens), and a
prompt too long for `task.eval.max_len` (or the model's context) loses tokens from its start.
Inputs shared by several choices (every single-token choice of one prompt) are run once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.core.errors import MoraTrainError
from mora_train.core.run_dir import RunDir


class ChoiceQuestion(Protocol):
    """One multiple-choice example: a prompt, its options, the index of the right one, and where it came from."""

    prompt: str
    choices: list[str]
    gold: int
    where: str


def model_context(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


# One scoring request: (example index, choice index, input index, the choice's token ids).
Request = tuple[int, int, int, list[int]]


@torch.no_grad()
def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ChoiceQuestion],
    batch_size: int,
    max_len: int,
    desc: str = "scoring",
) -> tuple[list[list[tuple[float, int]]], int]:
    """For each example and choice: (log p(choice | prompt), number of choice tokens); and how many prompts were cut."""
    model.eval()
    limit = min(max_len, model_context(model) or max_len)
    inputs, requests, truncated = _choice_requests(tokenizer, examples, limit)
    logprob_of = _token_logprobs(model, inputs, requests, batch_size, tokenizer.pad_token_id, desc)
    scores: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(ex.choices) for ex in examples]
    for e, c, index, choice_ids in requests:
        start = len(inputs[index]) - len(choice_ids)
        total = sum(logprob_of[(index, start + j, t)] for j, t in enumerate(choice_ids))
        scores[e][c] = (total, len(choice_ids))
    return scores, truncated


def _choice_requests(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[ChoiceQuestion], limit: int
) -> tuple[list[tuple[int, ...]], list[Request], int]:
    """The distinct model inputs (prompt + choice minus its last token, cut to `limit`), one request per choice,
    and how many prompts were cut."""
    sequences: dict[tuple[int, ...], int] = {}  # distinct model inputs -> index
    requests: list[Request] = []
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
    return list(sequences), requests, truncated


def _token_logprobs(
    model: PreTrainedModel,
    inputs: list[tuple[int, ...]],
    requests: list[Request],
    batch_size: int,
    pad: int,
    desc: str,
) -> dict[tuple[int, int, int], float]:
    """(input index, position, token) -> log-prob, for the positions and tokens the requests need."""
    device = next(model.parameters()).device
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths share a batch
    logprob_of: dict[tuple[int, int, int], float] = {}
    wanted: dict[int, list[tuple[int, int]]] = {}  # input index -> [(position, token)]
    for _, _, index, choice_ids in requests:
        start = len(inputs[index]) - len(choice_ids)  # position whose logits predict the first choice token
        wanted.setdefault(index, []).extend((start + j, t) for j, t in enumerate(choice_ids))
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = order[b : b + batch_size]
        longest = max(len(inputs[i]) for i in batch)
        ids = torch.tensor([list(inputs[i]) + [pad] * (longest - len(inputs[i])) for i in batch], device=device)
        mask = torch.tensor([[1] * len(inputs[i]) + [0] * (longest - len(inputs[i])) for i in batch], device=device)
        positions = sorted({p for i in batch for p, _ in wanted[i]})
        kept = torch.tensor(positions, device=device)
        try:  # only the logits we need: a full (batch, length, vocabulary) tensor is GBs for long prompts
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=kept, use_cache=False).logits
        except TypeError:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, kept]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        column = {p: k for k, p in enumerate(positions)}
        for row, i in enumerate(batch):
            for p, t in wanted[i]:
                logprob_of[(i, p, t)] = logprobs[row, column[p], t].item()
    return logprob_of


def evaluate_benchmark(
    name: str,
    score: str,
    examples: Sequence[ChoiceQuestion],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_len: int,
    predictions_file: Any,
) -> dict[str, float]:
    started = time.time()
    scores, truncated = score_choices(model, tokenizer, examples, batch_size, max_len, f"{name} eval")
    by_mean = score == "mean"
    correct = 0
    for example, choice_scores in zip(examples, scores, strict=True):
        values = [total / n if by_mean else total for total, n in choice_scores]
        predicted = max(range(len(values)), key=lambda i: values[i])
        correct += predicted == example.gold
        predictions_file.write(
            json.dumps(
                {
                    "benchmark": name,
                    "source": example.where,
                    "gold": example.gold,
                    "predicted": predicted,
                    "correct": predicted == example.gold,
                    "scores": [v if math.isfinite(v) else None for v in values],
                }
            )
            + "\n"
        )
    return {
        f"{name}_accuracy": correct / len(examples),
        f"{name}_samples": len(examples),
        f"{name}_prompts_truncated": truncated,
        f"{name}_runtime_s": time.time() - started,
    }


def evaluate_benchmarks(
    benchmarks: Mapping[str, Sequence[ChoiceQuestion]],
    scoring: Mapping[str, str],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_len: int,
    run_dir: Path,
) -> dict[str, float]:
    """Every benchmark's accuracy (+ samples, truncated prompts, runtime); per-example scores to
    benchmark_predictions.jsonl. `scoring`: benchmark name -> `sum` or `mean` (a name not given: sum)."""
    metrics: dict[str, float] = {}
    with open(RunDir(run_dir).benchmark_predictions, "w") as f:
        for name, examples in benchmarks.items():
            score = scoring.get(name, "sum")
            metrics.update(evaluate_benchmark(name, score, examples, model, tokenizer, batch_size, max_len, f))
    accuracies = [metrics[f"{name}_accuracy"] for name in benchmarks]
    # NaN when no benchmark is selected (task.eval.benchmarks=[]), so the key is always there for sweeps.
    metrics["benchmark_mean_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else float("nan")
    return metrics

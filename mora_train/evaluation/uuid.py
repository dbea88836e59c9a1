"""UUID memorization: generate the value for every key; character-level accuracy and exact match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.core.run_dir import RunDir
from mora_train.evaluation.config import UuidEvalSettings
from mora_train.evaluation.generation import greedy_generate


def char_accuracy(prediction: str, target: str) -> float:
    """Share of the target's characters reproduced at the same position (a short prediction misses the rest)."""
    hits = sum(1 for p, t in zip(prediction, target, strict=False) if p == t)
    return hits / len(target)


def evaluate(
    settings: UuidEvalSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Any,
    run_dir: Path,
    *,
    completion_template: str,
) -> dict[str, float]:
    """Generate the value of each key of `data` (.prompts, .targets); `completion_template` is what training
    taught after the prompt (" {value}")."""
    prompts, targets = data.prompts, data.targets
    if settings.max_samples is not None:
        prompts, targets = prompts[: settings.max_samples], targets[: settings.max_samples]
    completions = [completion_template.format(value=t) for t in targets]
    # Size the cap from the real tokenised targets (+EOS): a guessed cap silently truncates UUIDs.
    max_new_tokens = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions) + 1
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, settings.batch_size, "uuid eval")
    # The completion template puts text before the value (" {value}"); compare what follows it.
    prefix = completion_template.split("{value}", maxsplit=1)[0]
    # Anything generated after the value's length (a model that never learned to stop) is ignored.
    predictions = [o.removeprefix(prefix).strip()[: len(t)] for o, t in zip(outputs, targets, strict=True)]
    scores = [char_accuracy(p, t) for p, t in zip(predictions, targets, strict=True)]
    with open(RunDir(run_dir).predictions, "w") as f:
        f.writelines(
            json.dumps({"prompt": prompt, "target": target, "prediction": prediction, "char_accuracy": score}) + "\n"
            for prompt, target, prediction, score in zip(prompts, targets, predictions, scores, strict=True)
        )
    return {
        "char_accuracy": sum(scores) / len(scores),
        "exact_match": sum(p == t for p, t in zip(predictions, targets, strict=True)) / len(targets),
        "eval_samples": len(targets),
    }

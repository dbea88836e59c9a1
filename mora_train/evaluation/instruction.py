"""Instruction tuning evaluation: loss on held-out responses, plus a few generated answers to read."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.core.run_dir import RunDir
from mora_train.evaluation.config import InstructionEvalSettings
from mora_train.evaluation.generation import greedy_generate
from mora_train.evaluation.perplexity import loss_metrics, token_nll

Messages = list[dict[str, str]]  # chat messages, {role, content}


def evaluate(
    settings: InstructionEvalSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_examples: list[dict],
    conversations: list[Messages],
    run_dir: Path,
    *,
    collate: Callable[[list[dict]], dict[str, Any]],
    prompt: Callable[[Messages], str],
    prompt_has_special_tokens: bool = False,
) -> dict[str, Any]:
    """Loss on `eval_examples` (tokenized held-out conversations, batched by `collate`), and generated
    answers to the first task.eval.num_generations `conversations` (samples.jsonl).

    `prompt` renders the messages before a conversation's last assistant turn as the text a model
    continues; `prompt_has_special_tokens`: that text already holds them (a rendered chat template).
    """
    started = time.time()
    metrics: dict[str, Any] = loss_metrics(*token_nll(model, eval_examples, collate, settings.batch_size))
    metrics["eval_samples"] = len(eval_examples)
    # Prompt = the conversation up to its last assistant turn; that turn is the reference answer.
    samples = []
    for messages in conversations[: settings.num_generations]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        samples.append((messages[:last], messages[last]["content"]))
    if samples:
        prompts = [prompt(messages) for messages, _ in samples]
        outputs = greedy_generate(
            model,
            tokenizer,
            prompts,
            settings.max_new_tokens,
            settings.batch_size,
            "instruction samples",
            add_special_tokens=not prompt_has_special_tokens,
        )
        with open(RunDir(run_dir).samples, "w") as f:
            f.writelines(
                json.dumps({"prompt": text, "reference": reference, "generated": output}) + "\n"
                for (_, reference), text, output in zip(samples, prompts, outputs, strict=True)
            )
    metrics["eval_runtime_s"] = time.time() - started
    return metrics

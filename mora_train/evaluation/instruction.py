"""Instruction tuning evaluation: loss on held-out responses, plus a few generated answers to read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data.instruction import InstructionData, generation_prompt
from mora_train.evaluation.generation import greedy_generate
from mora_train.evaluation.perplexity import loss_metrics, token_nll


def evaluate(
    task_cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: InstructionData, run_dir: Path
) -> dict[str, Any]:
    started = time.time()
    metrics: dict[str, Any] = loss_metrics(*token_nll(model, data.eval_examples, tokenizer.pad_token_id, task_cfg.eval.batch_size))
    metrics["eval_samples"] = len(data.eval_examples)
    chat_template = bool(data.stats.get("chat_template"))
    # Prompt = the conversation up to its last assistant turn; that turn is the reference answer.
    samples = []
    for conversation in data.eval_conversations[: task_cfg.eval.num_generations]:
        last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
        samples.append((conversation.messages[:last], conversation.messages[last]["content"]))
    if samples:
        prompts = [generation_prompt(tokenizer, messages, chat_template) for messages, _ in samples]
        outputs = greedy_generate(
            model, tokenizer, prompts, task_cfg.eval.max_new_tokens, task_cfg.eval.batch_size, "instruction samples",
            add_special_tokens=not chat_template,  # a rendered chat template already holds its special tokens
        )
        with open(Path(run_dir) / "samples.jsonl", "w") as f:
            for (messages, reference), prompt, output in zip(samples, prompts, outputs):
                f.write(json.dumps({"prompt": prompt, "reference": reference, "generated": output}) + "\n")
    metrics["eval_runtime_s"] = time.time() - started
    return metrics

"""GSM8K-style evaluation: batched greedy generation, final-answer extraction, exact match (math-verify)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.data.math import MathData, format_pair
from mora_train.data.sources import as_plain
from mora_train.evaluation.answers import answers_match, cut_at_stop, extract_answer
from mora_train.evaluation.generation import greedy_generate


def evaluate(
    task_cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: MathData, run_dir: Path
) -> dict[str, Any]:
    problems = data.problems
    prompts = [format_pair(task_cfg, p.question, "")[0] for p in problems]
    stop = list(as_plain(task_cfg.eval.stop))
    started = time.time()
    outputs = greedy_generate(
        model, tokenizer, prompts, task_cfg.eval.max_new_tokens, task_cfg.eval.batch_size, f"{task_cfg.name} eval",
        stop_strings=stop or None,
    )
    elapsed = time.time() - started
    correct = found = 0
    with open(Path(run_dir) / "predictions.jsonl", "w") as f:
        for problem, output in zip(problems, outputs):
            completion = cut_at_stop(output, stop)
            prediction = extract_answer(completion)
            hit = answers_match(prediction, problem.gold)
            correct += hit
            found += prediction is not None
            f.write(json.dumps({
                "question": problem.question,
                "gold": problem.gold.text,
                "prediction": prediction.text if prediction else None,
                "correct": hit,
                "completion": completion,
                "source": problem.where,
            }) + "\n")
    n = len(problems)
    return {
        "accuracy": correct / n,
        "answer_found": found / n,  # share of completions with any extractable answer
        "eval_samples": n,
        "eval_runtime_s": elapsed,
        "eval_s_per_problem": elapsed / n,
    }

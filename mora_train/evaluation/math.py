"""GSM8K-style evaluation: batched greedy generation, final-answer extraction, exact match (math-verify)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.core.run_dir import RunDir
from mora_train.evaluation.answers import Answer, answers_match, cut_at_stop, extract_answer
from mora_train.evaluation.config import GenerationEvalSettings
from mora_train.evaluation.generation import greedy_generate


class MathQuestion(Protocol):
    """One evaluation problem: its question, gold final answer (as extract_answer reads it) and source."""

    question: str
    gold: Answer
    where: str


def evaluate(
    settings: GenerationEvalSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[MathQuestion],
    prompts: Sequence[str],
    run_dir: Path,
    *,
    name: str = "math",
) -> dict[str, Any]:
    """Answer each problem by greedy generation from its prompt (one per problem); accuracy of the final answers.
    `name` (the task's) labels the progress bar."""
    stop = list(settings.stop)
    started = time.time()
    outputs = greedy_generate(
        model,
        tokenizer,
        list(prompts),
        settings.max_new_tokens,
        settings.batch_size,
        f"{name} eval",
        stop_strings=stop or None,
    )
    elapsed = time.time() - started
    correct = found = 0
    with open(RunDir(run_dir).predictions, "w") as f:
        for problem, output in zip(problems, outputs, strict=True):
            completion = cut_at_stop(output, stop)
            prediction = extract_answer(completion)
            hit = answers_match(prediction, problem.gold)
            correct += hit
            found += prediction is not None
            f.write(
                json.dumps(
                    {
                        "question": problem.question,
                        "gold": problem.gold.text,
                        "prediction": prediction.text if prediction else None,
                        "correct": hit,
                        "completion": completion,
                        "source": problem.where,
                    }
                )
                + "\n"
            )
    n = len(problems)
    return {
        "accuracy": correct / n,
        "answer_found": found / n,  # share of completions with any extractable answer
        "eval_samples": n,
        "eval_runtime_s": elapsed,
        "eval_s_per_problem": elapsed / n,
    }

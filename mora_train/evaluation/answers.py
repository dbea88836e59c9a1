"""Final answers of math solutions: find the answer in a solution, and compare two answers.

Comparison is done by math-verify (Hugging Face's maintained answer checker): it parses numbers
with thousands separators (`1,080`), decimals, fractions, percentages, units and LaTeX (`\\boxed{}`,
`\\frac{}{}`) into sympy values and compares them numerically, so `$1,116.10` matches `1116.1`.
What we add is *where* the answer is: a GSM8K solution ends with `#### 42`, a MetaMathQA one with
`The answer is: 42`; otherwise the last number of the text counts (math-verify's own fallback).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from math_verify import parse, verify

_ANSWER_IS = re.compile(r"answer is\s*:?", re.IGNORECASE)


def answer_span(solution: str) -> str:
    """The part of a solution holding its final answer.

    `#### X` (GSM8K; the first one, in case a model goes on writing) wins, then the last
    `The answer is X`; otherwise the whole text, where the last number counts.
    """
    if "####" in solution:
        return solution.split("####", 1)[1].strip().split("\n", 1)[0]
    matches = list(_ANSWER_IS.finditer(solution))
    if matches:
        return solution[matches[-1].end() :].strip().split("\n", 1)[0]
    return solution


def _normalise(span: str) -> str:
    # A Unicode minus and "-$5" (minus before the currency sign) are not read as negatives otherwise.
    span = span.replace("\u2212", "-").replace("\u2013", "-")
    return re.sub(r"-\s*\$", "-", span)


@dataclass(frozen=True)
class Answer:
    text: str  # the answer as found, e.g. "1116.10"
    parsed: Any  # math-verify's parse result, for comparison


def extract_answer(solution: str) -> Answer | None:
    """The final answer of a solution, or None when it holds no number or expression."""
    span = _normalise(answer_span(solution))
    if not span.strip():
        return None
    # math-verify's timeout uses signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = parse(span, parsing_timeout=timeout)
    if not parsed:
        return None
    return Answer(text=str(parsed[-1]), parsed=parsed)


def answers_match(prediction: Answer | None, gold: Answer | None) -> bool:
    if prediction is None or gold is None:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold.parsed, prediction.parsed, timeout_seconds=timeout))


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text up to the first stop string (a model that keeps writing a next question is cut there)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]

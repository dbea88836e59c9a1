"""Math word problems: GSM8K (`question`/`answer`) and MetaMathQA (`query`/`response`) recipes.

Training: `prompt_template` filled with the question, then `completion_template` with the solution
(+ EOS); the loss is on the completion only. Evaluation data: the GSM8K test problems, each with its
gold final answer as found by the `final_answer` function the task passes in (tasks/math.py); they are
answered by greedy generation with the same prompt template (see evaluation/math.py).
Both recipes are this one module; only their configs differ (configs/task/gsm8k.yaml, metamath.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.core.errors import MoraTrainError
from mora_train.data.cache import tokenizer_fingerprint
from mora_train.data.common import (
    IGNORE_INDEX,
    tokenize_capped,
)
from mora_train.data.config import DataRecipe, TaskData, TooLong, template_problems
from mora_train.data.prepare import training_set
from mora_train.data.sources import Record, as_text, load_records, map_fields, render

# Reads a solution's final answer (None when there is none), e.g. evaluation.answers.extract_answer.
FinalAnswer = Callable[[str], Any]

_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass
class MathProblem:
    question: str
    reference: str  # the reference solution as given
    gold: Any  # its final answer, as final_answer() read it
    where: str


@dataclass
class MathData:
    train: Sequence[dict]
    problems: list[MathProblem]  # evaluation problems (the eval.max_samples prefix)
    stats: dict[str, Any] = field(default_factory=dict)


class MathTaskData(TaskData):
    fields: dict[str, str | None] = setting(
        factory=lambda: {"question": "question", "answer": "answer"},
        help='recipe field (question, answer) -> your field: a name, a dotted path (a.b.0) or a template ("{a} {b}")',
    )

    def required_fields(self) -> tuple[str, ...]:
        return ("question", "answer")


class MathRecipe(DataRecipe):
    """Math word problems (task=gsm8k, task=metamath; tasks/math.py adds the evaluation settings)."""

    data: MathTaskData = setting(help="the training and evaluation problems and the field mapping")
    prompt_template: str = setting(default="Question: {question}\nAnswer:", help="the prompt; must contain {question}")
    completion_template: str = setting(
        default=" {answer}", help="what the model learns to write; must contain {answer} (may use {question})"
    )
    strip_calculator_annotations: bool = setting(
        default=True, help="drop GSM8K's <<48/2=24>> calculator annotations from the training targets"
    )
    too_long: TooLong = setting(
        default="drop",
        help="examples longer than trainer.max_seq_len: drop them (a cut-off solution teaches the model to "
        "stop before its answer) or truncate them from the end",
    )

    def check(self, prefix: str) -> list[str]:
        return [
            *super().check(prefix),
            *template_problems(self.prompt_template, f"{prefix}.prompt_template", {"question"}, "question"),
            *template_problems(
                self.completion_template, f"{prefix}.completion_template", {"question", "answer"}, "answer"
            ),
        ]


def strip_calculator_annotations(solution: str) -> str:
    """Drop GSM8K's `<<48/2=24>>` calculator annotations (the model should write the arithmetic itself)."""
    return _CALCULATOR.sub("", solution)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    """ids of prompt + completion + EOS, labels only on completion + EOS (the EOS teaches the model to stop).

    With max_tokens, each part is tokenized only as far as those tokens (common.tokenize_capped): a huge
    record costs what its first max_tokens tokens cost; fit_to_length then truncates or drops it as usual."""
    if max_tokens is not None:
        prompt_ids = tokenize_capped(tokenizer, prompt, max_tokens, add_special_tokens=True)
        completion_ids = [*tokenize_capped(tokenizer, completion, max_tokens), tokenizer.eos_token_id]
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def format_pair(settings: MathRecipe, question: str, answer: str) -> tuple[str, str]:
    if settings.strip_calculator_annotations:
        answer = strip_calculator_annotations(answer)
    canonical = Record({"question": question, "answer": answer}, "")
    return (
        render(settings.prompt_template, canonical, "task.prompt_template"),
        render(settings.completion_template, canonical, "task.completion_template"),
    )


def prompt(settings: MathRecipe, question: str) -> str:
    """The prompt a model answers `question` from (training's prompt template, with no answer after it)."""
    return format_pair(settings, question, "")[0]


def tokenize_train(
    settings: MathRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> tuple[Sequence[dict], dict]:
    fields = settings.data.fields

    def encode(record: Record) -> tuple[list[int], list[int]]:
        values = map_fields(record, fields, "task.data.fields", ("question", "answer"))
        prompt, completion = format_pair(settings, as_text(values["question"]), as_text(values["answer"]))
        return encode_pair(tokenizer, prompt, completion, max_seq_len)

    key = {
        "recipe": "math",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": {
            "prompt_template": settings.prompt_template,
            "completion_template": settings.completion_template,
            "strip_calculator_annotations": settings.strip_calculator_annotations,
        },
        "fields": fields,
    }
    examples, meta = training_set(settings, encode, key, max_seq_len)
    return examples, meta


def load_problems(settings: MathRecipe, final_answer: FinalAnswer, limit: int | None) -> list[MathProblem]:
    """The first `limit` evaluation problems (None: all), each with its gold final answer (a reference without
    one is a data error)."""
    fields = settings.data.fields
    records = load_records(settings.data.eval, "task.data.eval")
    problems = []
    for record in records[:limit] if limit else records:
        values = map_fields(record, fields, "task.data.fields", ("question", "answer"))
        reference = as_text(values["answer"])
        gold = final_answer(reference)
        if gold is None:
            raise MoraTrainError(
                f"{record.where}: no final answer found in the reference answer {reference[-80:]!r}; GSM8K-style "
                "answers end with '#### 42', MetaMathQA-style ones with 'The answer is: 42'"
            )
        problems.append(MathProblem(as_text(values["question"]), reference, gold, record.where))
    return problems


def build(
    settings: MathRecipe,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    final_answer: FinalAnswer,
    eval_limit: int | None,
) -> MathData:
    """Training examples and the first `eval_limit` evaluation problems (task.eval.max_samples)."""
    problems = load_problems(settings, final_answer, eval_limit)  # first: a bad eval file fails before tokenizing
    train, meta = tokenize_train(settings, tokenizer, max_seq_len)
    return MathData(train=train, problems=problems, stats=meta)


def build_eval(settings: MathRecipe, final_answer: FinalAnswer, eval_limit: int | None) -> MathData:
    return MathData(train=[], problems=load_problems(settings, final_answer, eval_limit))

"""Math word problems: GSM8K (`question`/`answer`) and MetaMathQA (`query`/`response`) recipes.

Training: `prompt_template` filled with the question, then `completion_template` with the solution
(+ EOS); the loss is on the completion only. Evaluation data: the GSM8K test problems, each with its
gold final answer as found by the `final_answer` function the task passes in (tasks/math.py); they are
answered by greedy generation with the same prompt template (see evaluation/math.py).
Both recipes are this one module; only their configs differ (configs/task/gsm8k.yaml, metamath.yaml).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from mora_train.data.cache import cached, tokenizer_fingerprint
from mora_train.data.common import IGNORE_INDEX, LengthReport, fit_to_length, log_length_report, require_examples, tokenize_capped
from mora_train.data.recipe import check_eval_settings, check_template, common_problems
from mora_train.data.sources import Record, as_plain, as_text, fingerprint_sources, load_records, map_fields, render
from mora_train.core.errors import MoraTrainError

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
    train: list[dict]
    problems: list[MathProblem]  # evaluation problems (the eval.max_samples prefix)
    stats: dict[str, Any] = field(default_factory=dict)


def config_problems(task_cfg: DictConfig) -> list[str]:
    problems = common_problems(task_cfg, ("question", "answer"))
    check_template(task_cfg, "prompt_template", {"question"}, "question", problems)
    check_template(task_cfg, "completion_template", {"question", "answer"}, "answer", problems)
    check_eval_settings(task_cfg.get("eval"), problems, ("max_new_tokens",))
    stop = as_plain(task_cfg.get("eval", {}).get("stop")) if isinstance(task_cfg.get("eval"), DictConfig) else None
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        problems.append(f"`task.eval.stop={stop!r}` must be a list of non-empty strings (may be empty: [])")
    return problems


def strip_calculator_annotations(solution: str) -> str:
    """Drop GSM8K's `<<48/2=24>>` calculator annotations (the model should write the arithmetic itself)."""
    return _CALCULATOR.sub("", solution)


def _fields(task_cfg: DictConfig) -> dict[str, str]:
    return as_plain(task_cfg.data.fields)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    """ids of prompt + completion + EOS, labels only on completion + EOS (the EOS teaches the model to stop).

    With max_tokens, each part is tokenized only as far as those tokens (common.tokenize_capped): a huge
    record costs what its first max_tokens tokens cost; fit_to_length then truncates or drops it as usual."""
    if max_tokens is not None:
        prompt_ids = tokenize_capped(tokenizer, prompt, max_tokens, add_special_tokens=True)
        completion_ids = tokenize_capped(tokenizer, completion, max_tokens) + [tokenizer.eos_token_id]
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def format_pair(task_cfg: DictConfig, question: str, answer: str) -> tuple[str, str]:
    if task_cfg.get("strip_calculator_annotations", False):
        answer = strip_calculator_annotations(answer)
    canonical = Record({"question": question, "answer": answer}, "")
    return (
        render(task_cfg.prompt_template, canonical, "task.prompt_template"),
        render(task_cfg.completion_template, canonical, "task.completion_template"),
    )


def prompt(task_cfg: DictConfig, question: str) -> str:
    """The prompt a model answers `question` from (training's prompt template, with no answer after it)."""
    return format_pair(task_cfg, question, "")[0]


def tokenize_train(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> tuple[list[dict], dict]:
    fields = _fields(task_cfg)

    def build() -> tuple[list[dict], dict]:
        report = LengthReport()
        examples = []
        for record in load_records(task_cfg.data.train, "task.data.train"):
            values = map_fields(record, fields, "task.data.fields", ("question", "answer"))
            prompt, completion = format_pair(task_cfg, as_text(values["question"]), as_text(values["answer"]))
            example = fit_to_length(*encode_pair(tokenizer, prompt, completion, max_seq_len), max_seq_len, task_cfg.too_long, report)
            if example is not None:
                examples.append(example)
        return examples, report.as_dict()

    key = {
        "recipe": "math",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
        "settings": {k: as_plain(task_cfg.get(k)) for k in ("prompt_template", "completion_template", "too_long", "strip_calculator_annotations")},
        "fields": fields,
        "data": fingerprint_sources(task_cfg.data.train),
    }
    examples, meta = cached(task_cfg.get("cache_dir"), f"{task_cfg.name}-train", key, build)
    report = LengthReport(meta["examples_read"], meta["truncated"], meta["dropped"])
    log_length_report(f"{task_cfg.name} training set", report, max_seq_len)
    require_examples(examples, "task.data.train", report, max_seq_len, task_cfg.too_long)
    return examples, meta


def load_problems(task_cfg: DictConfig, final_answer: FinalAnswer) -> list[MathProblem]:
    """The evaluation prefix, each with its gold final answer (a reference without one is a data error)."""
    fields = _fields(task_cfg)
    records = load_records(task_cfg.data.eval, "task.data.eval")
    limit = task_cfg.eval.get("max_samples")
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


def build(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, final_answer: FinalAnswer) -> MathData:
    problems = load_problems(task_cfg, final_answer)  # first, so a bad eval file fails before minutes of tokenizing
    train, meta = tokenize_train(task_cfg, tokenizer, max_seq_len)
    return MathData(train=train, problems=problems, stats=meta)


def build_eval(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, final_answer: FinalAnswer) -> MathData:
    return MathData(train=[], problems=load_problems(task_cfg, final_answer))

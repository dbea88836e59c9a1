"""Pretraining and continual pretraining (biomed, finance, pretrain): packed text and benchmark records
from data/pretrain.py, held-out perplexity and benchmark accuracy from evaluation/pretrain.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.data import pretrain as data
from mora_train.data.common import PadCollator
from mora_train.evaluation import pretrain as evaluation
from mora_train.evaluation.config import PerplexityEvalSettings
from mora_train.models.attention import flattens_packed_rows
from mora_train.tasks.task import Task
from mora_train.tasks.validation import ValidationSplit


class PretrainSettings(data.PretrainRecipe, ValidationSplit):
    """task=pretrain / biomed / finance: packed raw text, held-out perplexity and zero-shot benchmarks."""

    eval: PerplexityEvalSettings = setting(
        factory=PerplexityEvalSettings, help="held-out perplexity, then the benchmarks task.eval.benchmarks selects"
    )

    def check(self, prefix: str) -> list[str]:
        selection = self.selection_problems(self.eval.benchmarks, prefix, f"{prefix}.eval.benchmarks")
        return [*super().check(prefix), *selection]


def build(settings: PretrainSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.PretrainData:
    return data.build(settings, tokenizer, max_seq_len, settings.eval.max_samples, settings.eval.benchmarks)


def build_eval(settings: PretrainSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> data.PretrainData:
    return data.build_eval(settings, tokenizer, max_seq_len, settings.eval.max_samples, settings.eval.benchmarks)


def evaluate(
    settings: PretrainSettings,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    built: data.PretrainData,
    run_dir: Path,
) -> dict[str, Any]:
    return evaluation.evaluate(
        settings.eval,
        model,
        tokenizer,
        list(built.eval_blocks),  # the evaluators take a list (the old readers gave one too)
        built.benchmarks,
        PadCollator(tokenizer.pad_token_id, flatten=flattens_packed_rows(model)),
        run_dir,
        scoring={name: bench.score for name, bench in settings.benchmarks.items()},
    )


def validation(
    settings: PretrainSettings, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, built: data.PretrainData
) -> list[dict]:
    """The held-out text, packed as the training text is."""
    return list(built.eval_blocks)


def task(name: str, primary_metric: str, greater_is_better: bool) -> Task:
    """One recipe, several task names: configs/task/NAME.yaml sets the text and the benchmarks."""
    return Task(
        name=name,
        primary_metric=primary_metric,
        greater_is_better=greater_is_better,
        settings=PretrainSettings,
        build=build,
        build_eval=build_eval,
        evaluate=evaluate,
        validation=validation,
    )

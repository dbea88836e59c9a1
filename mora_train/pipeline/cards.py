"""The model cards of a run: their facts gathered from the live run at its end, written into adapter/ and merged/
and recorded as RUN_DIR/card_facts.json; and the facts an export of the run (or of a bare adapter folder) starts
from (`export_card_facts`). The cards themselves are mora_train.export.card's."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from mora_train.adapters import Adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.core.metrics import scores_of
from mora_train.core.run_dir import RunDir
from mora_train.data.config import DataRecipe, resolve_sources
from mora_train.export import ExportResult
from mora_train.export.card import (
    ADAPTER,
    MERGED,
    CardFacts,
    LayerShape,
    LoraExport,
    MergeCheck,
    Training,
    read_card_facts,
    write_card_facts,
    write_model_card,
)
from mora_train.export.checks import dtype_name
from mora_train.models.config import ModelConfig
from mora_train.models.hub import base_model_id, base_weights_note
from mora_train.pipeline.run_config import RunConfig


def layer_shapes(adapter: Adapter) -> list[LayerShape]:
    """The adapted layers grouped by kind, shape and size (what the run summary shows). Read before the merge:
    a merged adapter has no layers left."""
    groups: dict[tuple[str, int, int, str], list[int]] = defaultdict(list)
    for row in adapter.module_summaries():
        groups[(row.name.rsplit(".", 1)[-1], row.d_out, row.d_in, row.size)].append(row.trainable)
    return [
        LayerShape(kind, d_out, d_in, size, len(counts), counts[0])
        for (kind, d_out, d_in, size), counts in sorted(groups.items())
    ]


def base_description(model: ModelConfig) -> str:
    """The base model in words, for a card whose base has no Hub id."""
    if model.random_init is not None:
        architecture = model.random_init.get("architecture", "llama")
        return f"a randomly initialised {architecture} model, built from model.random_init"
    return f"{model.name_or_path}" if model.name_or_path else "the run's base model"


def model_name(model: ModelConfig, method: str, task: str) -> str:
    """A short name for the fine-tuned model: BASE-METHOD-TASK."""
    hub_id = base_model_id(model)
    if hub_id:
        base = hub_id.rsplit("/", 1)[-1]
    elif model.random_init is not None:
        base = f"random-{model.random_init.get('architecture', 'llama')}"
    else:
        base = Path(model.name_or_path or "model").stem.split(".")[0]
    return f"{base}-{method}-{task}"


def task_datasets(config: RunConfig) -> tuple[list[str], str | None]:
    """(the Hub dataset ids the task's data names, the one its evaluation reads); none for local files and for
    tasks that make their own data."""
    if not isinstance(config.task, DataRecipe):
        return [], None
    train, _ = resolve_sources(config.task.data.train, "task.data.train")
    held_out, _ = resolve_sources(config.task.data.eval, "task.data.eval") if config.task.data.eval else ([], [])
    ids = [s.hub for s in [*train, *held_out] if s.hub]
    evaluated = next((s.hub for s in held_out if s.hub), None)
    return list(dict.fromkeys(ids)), evaluated


def adapter_library(adapter_dir: Path | None) -> str:
    """Who reads the adapter folder: peft where peft wrote it (its adapter_config.json has `peft_type`), else
    mora-train (load_adapter)."""
    if adapter_dir is None or not (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        return "mora-train"
    saved = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    return "peft" if isinstance(saved, dict) and "peft_type" in saved else "mora-train"


def merge_check(record: dict[str, Any], export: ExportResult) -> MergeCheck:
    dtype = next((p.dtype for p in export.model.parameters() if p.is_floating_point()), torch.float32)
    return MergeCheck(
        max_abs_diff=export.max_abs_diff,
        tolerance=export.tolerance,
        passed=export.passed,
        dtype=dtype_name(dtype),
        before_cast_max_abs_diff=record.get("merge_before_cast_max_abs_diff"),
        before_cast_tolerance=record.get("merge_before_cast_tolerance"),
        kernel_max_abs_diff=record.get("quantized_kernel_max_abs_diff"),
        kernel_tolerance=record.get("quantized_kernel_tolerance"),
    )


def run_card_facts(
    config: RunConfig,
    adapter: Adapter,
    layers: list[LayerShape],
    record: dict[str, Any],
    export: ExportResult,
    adapter_dir: Path | None,
) -> CardFacts:
    """What the run's cards say, from its config, its adapter (`layers` read before the merge), its metrics.json
    record and its merge check."""
    datasets, evaluated = task_datasets(config)
    trainer = config.trainer
    return CardFacts(
        name=model_name(config.model, adapter.name, config.task.name),
        method=adapter.name,
        title=adapter.title(),
        base_model=base_model_id(config.model),
        base_model_note=base_weights_note(config.model),
        base_description=base_description(config.model),
        settings=adapter.describe(),
        layers=layers,
        trainable_params=record.get("trainable_params"),
        total_params=record.get("total_params"),
        training=Training(
            task=config.task.name,
            steps=record.get("train_steps"),
            learning_rate=trainer.learning_rate,
            batch_size=trainer.batch_size,
            max_seq_len=trainer.max_seq_len,
            precision=trainer.precision,
            seed=config.seed,
            train_loss=record.get("train_loss"),
            runtime_s=record.get("train_runtime_s"),
        ),
        datasets=datasets,
        eval_dataset=evaluated,
        metrics=scores_of(record) if export.passed else {},
        primary_metric=record.get("primary_metric"),
        greater_is_better=bool(record.get("greater_is_better", True)),
        merge=merge_check(record, export),
        adapter_library=adapter_library(adapter_dir),
    )


def write_run_cards(run_dir: Path, facts: CardFacts, adapter_dir: Path | None, merged_passed: bool) -> None:
    """README.md into adapter/ (when the run has one) and into merged/ (when it passed its check), and the facts
    beside them for the cards of later exports."""
    if adapter_dir is not None:
        write_model_card(adapter_dir, facts, ADAPTER)
    if merged_passed:
        write_model_card(RunDir(run_dir).merged, facts, MERGED)
    write_card_facts(run_dir, facts)


def export_card_facts(source: Path, model: ModelConfig) -> CardFacts:
    """The facts an export's card starts from: the run's own (RUN_DIR/card_facts.json, also for SOURCE =
    RUN_DIR/adapter) with the base model named as `model` names it; for an adapter folder on its own, or a run from
    before cards, what its adapter_config.json says."""
    # An adapter folder still inside its run dir (RUN_DIR/adapter) has the run's facts beside it.
    inside_run = (source / ADAPTER_CONFIG_NAME).is_file() and RunDir(source.parent).adapter == source
    recorded = read_card_facts(source.parent if inside_run else source)
    base_model, note, description = base_model_id(model), base_weights_note(model), base_description(model)
    if recorded is not None:
        return dataclasses.replace(recorded, base_model=base_model, base_model_note=note, base_description=description)
    folder = source if (source / ADAPTER_CONFIG_NAME).is_file() else RunDir(source).adapter
    saved = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    method = str(saved.get("adapter") or saved.get("peft_type") or "adapter").lower()
    return CardFacts(
        name=model_name(model, method, "export"),
        method=method,
        title=method,
        base_model=base_model,
        base_model_note=note,
        base_description=description,
        settings=saved,
        adapter_library=adapter_library(folder),
    )


def lora_card_facts(source: Path, model: ModelConfig, report: dict[str, Any]) -> CardFacts:
    """The card facts of a PEFT LoRA export (pipeline.lora_export's report): the run's, and how exact the export is.
    A truncated export is not the trained model: its card carries the export's own evaluated score, or none."""
    facts = export_card_facts(source, model)
    evaluation = report.get("evaluation") or {}
    lora = LoraExport(
        rank=int(report["rank"]),
        truncated=bool(report["truncated"]),
        max_relative_error=float(report["max_relative_error"]),
        mean_relative_error=float(report["mean_relative_error"]),
        peft_max_abs_logit_diff=report.get("peft_max_abs_logit_diff"),
        per_layer_ranks=not report.get("uniform_rank", True),
        dtype=report.get("dtype"),
        how=report.get("how"),
        metric=evaluation.get("metric"),
        metric_trained=evaluation.get("adapter"),
        metric_exported=evaluation.get("exported_lora"),
    )
    metrics = facts.metrics
    if lora.truncated:
        exported = lora.metric_exported
        metrics = {lora.metric: exported} if lora.metric and exported is not None else {}
    return dataclasses.replace(facts, lora=lora, metrics=metrics)

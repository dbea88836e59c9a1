"""One run, start to finish: config -> model -> adapter -> data -> train -> export -> evaluate -> metrics.

The recipe has three steps, which `_run` calls in order: `setup_run` (every check, then model, data, adapter and
the run dir), `train_run` (every rank trains) and `finish_run` (rank 0 exports, verifies, evaluates and writes the
record). The run dir's checks and records live in pipeline.run_dir, its log file in pipeline.run_log.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from mora_train.adapters import Adapter, adapter_identity, build_adapter
from mora_train.adapters.base import count_parameters
from mora_train.core.errors import EXIT_MERGE_CHECK, MoraTrainError, RunStopped
from mora_train.core.io import write_dir_atomically, write_json_atomically
from mora_train.core.metrics import RUN_SECTION, make_record
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import RunDirLock
from mora_train.export import (
    ExportResult,
    export_merged,
    probe_batch,
    quantized_reference_logits,
    unsharded_adapter,
)
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.cards import layer_shapes, run_card_facts, write_run_cards
from mora_train.pipeline.run_config import ComposedConfig, RunConfig
from mora_train.pipeline.run_dir import check_run_dir, prepare_run_dir, write_output_checksums
from mora_train.pipeline.scoring import evaluate_model, not_evaluated
from mora_train.pipeline.validate import validate
from mora_train.tasks import TASKS
from mora_train.tasks.validation import Validation, build_validation
from mora_train.training import distributed, tracking
from mora_train.training.checkpoints import checkpoint_step
from mora_train.training.preflight import PlannedRun, check_model_fit
from mora_train.training.resilience import format_bytes, free_bytes, is_disk_full
from mora_train.training.restarts import TrainingExtras, setup_training_extras
from mora_train.training.resume import apply_resume_plan, decide_resume, resume_command
from mora_train.training.trainer import TrainResult, plot_loss, train


def format_summary(config: RunConfig, adapter: Adapter) -> str:
    """One screen: model, adapter, per-layer-kind size (r or r̂) and trainable parameters."""
    trainable, total = count_parameters(adapter.model)
    random_init = config.model.random_init or {}
    model_name = config.model.name_or_path or f"random {random_init.get('architecture', 'llama')}"
    quantization = config.model.quantization_name
    if quantization != "none":
        model_name += f" ({quantization} base, de-quantized in the merged checkpoint)"
    lines = [
        f"model:     {model_name}",
        f"adapter:   {adapter.title()}",
        f"trainable: {trainable:,} of {total:,} parameters ({100.0 * trainable / total:.3f}%)",
    ]
    shapes = layer_shapes(adapter)
    if shapes:
        lines.append(f"  {'layer':<12} {'shape (out x in)':>17} {'size':>8} {'layers':>6} {'params/layer':>13}")
        lines += [
            f"  {s.kind:<12} {f'{s.d_out} x {s.d_in}':>17} {s.size:>8} {s.layers:>6} {s.params_per_layer:>13,}"
            for s in shapes
        ]
    return "\n".join(lines)


def run(composed: ComposedConfig) -> dict[str, Any]:
    """Train, export, verify and evaluate as the config says; return the metrics written to metrics.json.

    A run that stops early (signal, non-finite loss, full disk) raises RunStopped, whose message ends
    with the command that resumes it.
    """
    run_dir = composed.output_dir
    # One writer per run dir, held until the run ends (the main process writes; the other ranks only read).
    lock = RunDirLock(run_dir, "mora-train") if distributed.is_main_process() else None
    try:
        return _run(composed, lock)
    except RunStopped as err:
        raise RunStopped(f"{err}: {resume_command(run_dir)}", err.exit_code) from err.__cause__
    except MoraTrainError:
        raise
    except Exception as err:
        if not is_disk_full(err, run_dir):
            raise
        raise RunStopped(
            f"no space left on the disk holding {run_dir} ({format_bytes(free_bytes(run_dir))} free; "
            f"{type(err).__name__}: {err}). Folders are written under temporary names and renamed when complete, "
            "so nothing half-written is in place, and completed checkpoints are intact. Free some space, then "
            f"resume: {resume_command(run_dir)}",
            exit_code=4,
        ) from err
    finally:
        tracking.close(failed=True)  # what a run that ended early left open (a finished run has closed its own)
        if lock is not None:
            lock.release()


@dataclass
class PreparedRun:
    """What setup hands to training and to finishing: the checked config, its run dir and what was built."""

    config: RunConfig
    run_dir: Path
    task: Any
    tokenizer: Any
    data: Any
    adapter: Adapter
    extras: TrainingExtras
    resume_from: Path | None
    parameter_counts: tuple[int, int]  # trainable, total (before training: what the summary shows)
    started: float
    validation: Validation | None = None  # evaluation while training: the training examples left and the eval set


def _run(composed: ComposedConfig, lock: RunDirLock | None) -> dict[str, Any]:
    prepared = setup_run(composed, lock)
    result = train_run(prepared)
    return distributed.run_on_main_process(lambda: finish_run(prepared, result))


def setup_run(composed: ComposedConfig, lock: RunDirLock | None) -> PreparedRun:
    """Check the config and the run dir, build model, data and adapter; then, every refusal passed, write the run dir.

    Under a multi-process launch rank 0 alone checks the config (one error message, not one per rank),
    checks the run dir and decides which checkpoint to resume from; the others share its outcome.
    Nothing is written into the run dir until every refusal has passed (docs/errors.md)."""
    started = time.time()
    config = distributed.run_on_main_process(lambda: validate(composed))
    run_dir = distributed.run_on_main_process(lambda: check_run_dir(config, lock))
    identity = adapter_identity(config.adapter, config.rank)
    plan = distributed.run_on_main_process(
        lambda: decide_resume(run_dir, config.trainer.resume, config.overwrite, identity)
    )
    set_seed(config.seed)
    task = TASKS[config.task.name]

    model, tokenizer = load_model_and_tokenizer(config.model)
    fit = PlannedRun(config.model, config.trainer, config.adapter, config.rank, run_dir, config.export.torch_dtype)
    check_model_fit(model, fit)
    data = task.build(config.task, tokenizer, config.trainer.max_seq_len)
    if not data.train:
        raise MoraTrainError(f"task {task.name} produced no training examples; check task.* settings")
    validation = build_validation(task, config.task, config.trainer, tokenizer, data, config.seed)
    adapter = build_adapter(
        model, config.adapter, config.rank, load_base=lambda: load_model_and_tokenizer(config.model)[0]
    )
    extras = setup_training_extras(adapter, config.trainer, config.seed)  # restarts, trained embeddings
    # Every refusal has passed: from here on the run dir is written.
    run_dir = distributed.run_on_main_process(lambda: prepare_run_dir(config, composed))
    if distributed.is_main_process():
        tracking.start(config.logging, composed.resolved(), run_dir)  # logging.report_to's runs, grouped by sweep
    resume_from = distributed.run_on_main_process(lambda: apply_resume_plan(plan))
    counts = count_parameters(adapter.model)
    prepared = PreparedRun(config, run_dir, task, tokenizer, data, adapter, extras, resume_from, counts, started)
    prepared.validation = validation
    if distributed.is_main_process():
        announce(prepared)
    return prepared


def announce(prepared: PreparedRun) -> None:
    """Rank 0: where training resumes from, and the model and adapter summary."""
    if prepared.resume_from is not None:
        print(
            f"resuming from {prepared.resume_from} (step {checkpoint_step(prepared.resume_from)}); "
            "trainer.resume=false overwrite=true starts over instead",
            flush=True,
        )
    print(format_summary(prepared.config, prepared.adapter), flush=True)
    if prepared.validation is not None:
        print(f"validation: {prepared.validation.source}", flush=True)


def train_run(prepared: PreparedRun) -> TrainResult:
    """Every rank trains (mora_train.training.trainer: checkpoints, stops on signals, non-finite losses)."""
    config, validation = prepared.config, prepared.validation
    return train(
        prepared.adapter,
        prepared.tokenizer,
        validation.train if validation is not None else prepared.data.train,
        config.trainer,
        config.seed,
        prepared.run_dir,
        prepared.resume_from,
        prepared.extras,
        config.distributed,
        config.logging,
        eval_examples=validation.examples if validation is not None else None,
    )


def finish_run(prepared: PreparedRun, result: TrainResult) -> dict[str, Any]:
    """Rank 0: export the adapter and the merged model, verify, evaluate, write metrics and the loss plot."""
    config, task, run_dir = prepared.config, prepared.task, prepared.run_dir
    tokenizer, data = prepared.tokenizer, prepared.data
    # After ZeRO / FSDP training the live weights are shards: export a rebuilt copy holding the gathered ones.
    adapter = unsharded_adapter(prepared.adapter, result.final_weights, lambda: rebuilt_adapter(config))
    adapter_dir = None
    if not adapter.saves_whole_model:  # otherwise adapter/ would only repeat merged/
        adapter_dir = RunDir(run_dir).adapter
        write_dir_atomically(adapter_dir, adapter.save)
    layers = layer_shapes(adapter)  # for the model cards: the merge below leaves the adapter without layers
    export = export_checked_merge(config, adapter, tokenizer, data, run_dir, adapter_dir)
    scores = evaluate_verified_merge(config, task, export, tokenizer, data, run_dir)
    metrics = run_record(config, task, adapter, result, export, scores, prepared.parameter_counts, prepared.started)
    metrics[RUN_SECTION].update(evaluation_record(prepared.validation, result))
    facts = run_card_facts(config, adapter, layers, metrics, export, adapter_dir)
    write_run_cards(run_dir, facts, adapter_dir, export.passed)
    if export.passed:
        write_output_checksums(run_dir)  # the cards included
    plot_loss(result.log_history, RunDir(run_dir).loss_plot, f"{adapter.title()} on {task.name}")
    write_json_atomically(RunDir(run_dir).metrics, metrics)
    tracking.finish(metrics)  # the final metrics and the merge check, to the trackers of logging.report_to
    if not export.passed:
        raise MoraTrainError(export.failure_message(adapter_dir), exit_code=EXIT_MERGE_CHECK)
    return metrics


def evaluation_record(validation: Validation | None, result: TrainResult) -> dict[str, Any]:
    """metrics.json's `run` keys of evaluation while training: the validation set, where training ended, and the
    step whose weights adapter/ and merged/ hold (the best one under trainer.load_best)."""
    return {
        "validation": validation.source if validation is not None else None,
        "early_stopped_at_step": result.stopped_early_at,
        "weights_step": result.weights_step if result.weights_step is not None else result.steps,
    }


def rebuilt_adapter(config: RunConfig) -> Adapter:
    """The run's adapter built afresh on a freshly loaded base (same seed), for the gathered weights."""
    set_seed(config.seed)

    def load_base() -> Any:
        return load_model_and_tokenizer(config.model)[0]

    return build_adapter(load_base(), config.adapter, config.rank, load_base=load_base)


def export_checked_merge(
    config: RunConfig, adapter: Adapter, tokenizer: Any, data: Any, run_dir: Path, adapter_dir: Path | None
) -> ExportResult:
    """Merge into run_dir/merged and check it against the trained model (see mora_train.export)."""
    probe = probe_batch(data.train, tokenizer.pad_token_id)
    quantized_reference = None
    # Trained embeddings are not in adapter/: such runs are checked against the live model's forward.
    if config.model.is_quantized and adapter_dir is not None and not config.trainer.train_embeddings:
        # The merge check's reference on a quantized base: the saved adapter on a freshly loaded quantized base,
        # which nothing done to the live model (an eval forward, the export's de-quantization) can reach.
        quantized_reference = quantized_reference_logits(
            lambda: load_model_and_tokenizer(config.model)[0], adapter_dir, probe
        )
    return export_merged(
        adapter,
        tokenizer,
        probe,
        RunDir(run_dir).merged,
        config.export.torch_dtype,
        quantized_reference=quantized_reference,
        trust_remote_code=config.model.trust_remote_code,
    )


def evaluate_verified_merge(
    config: RunConfig, task: Any, export: ExportResult, tokenizer: Any, data: Any, run_dir: Path
) -> Any:
    """The task's scores of a merge that passed its check (eval.backend's evaluators); otherwise none, and the
    merge moved out of the way."""
    if export.passed:
        return evaluate_model(config, task, export.model, tokenizer, data, run_dir)
    # A merge that does not reproduce the trained model is never evaluated nor left where a finished
    # run's merged/ is expected; the record says so, and the adapter stays usable.
    unverified = RunDir(run_dir).merged_unverified
    shutil.rmtree(unverified, ignore_errors=True)
    os.replace(export.merged_dir, unverified)
    export.merged_dir = unverified
    return not_evaluated(task)


def run_record(
    config: RunConfig,
    task: Any,
    adapter: Adapter,
    result: TrainResult,
    export: ExportResult,
    scores: Any,
    parameter_counts: tuple[int, int],
    started: float,
) -> dict[str, Any]:
    """The run's metrics.json record: identity, scores, training results and merge checks, bookkeeping."""
    identity = {
        "task": task.name,
        **adapter.identity_now(),
        "adapter_config": adapter.describe(),
        "quantization": config.model.quantization_name,
    }
    identity.setdefault("rank", None)
    before_cast = export.before_cast
    training = {
        "train_loss": result.train_loss,
        "final_logged_loss": next((h["loss"] for h in reversed(result.log_history) if "loss" in h), None),
        "train_steps": result.steps,
        "trainable_params": parameter_counts[0],
        "total_params": parameter_counts[1],
        "train_runtime_s": result.runtime_s,
        "tokens_per_s": result.tokens_per_s,
        "merge_max_abs_diff": export.max_abs_diff,
        "merge_tolerance": export.tolerance,
        "merge_before_cast_max_abs_diff": before_cast.max_abs_diff if before_cast is not None else None,
        "merge_before_cast_tolerance": before_cast.tolerance if before_cast is not None else None,
        "quantized_kernel_max_abs_diff": export.quantized_kernel_diff,
        "quantized_kernel_tolerance": export.quantized_kernel_tolerance,
        "best_eval_loss": result.best_eval_loss,
        "best_step": result.best_step,
    }
    run_info = {
        "wall_time_s": time.time() - started,
        "resumed_from_step": result.resumed_from_step,
        "nonfinite_skipped_steps": result.skipped_steps,
        "merge_check": "passed" if export.passed else "failed",
        **(result.final_weights.to_json() if result.final_weights else {}),
    }
    return make_record(
        identity,
        scores.primary_metric,
        scores.greater_is_better,
        scores.metrics,
        training,
        run_info,
        lm_eval=scores.lm_eval,
    )

"""Train an Adapter with transformers.Trainer (Accelerate underneath; DeepSpeed/FSDP by config).

The Trainer subclass (checkpoints, the non-finite guard) is mora_train.training.adapter_trainer.AdapterTrainer.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from mora_train.adapters.base import Adapter
from mora_train.core.errors import RunStopped
from mora_train.core.io import save_figure_atomically, write_json_atomically
from mora_train.core.run_dir import RunDir
from mora_train.data.common import PadCollator, count_tokens
from mora_train.data.packing import training_rows
from mora_train.models.attention import flattens_packed_rows
from mora_train.models.quantization import adapters_attached
from mora_train.training import tracking
from mora_train.training.adapter_trainer import AdapterTrainer
from mora_train.training.checkpoints import checkpoint_step, is_complete
from mora_train.training.config import TrainerConfig
from mora_train.training.distributed import is_main_process, rank, world_size
from mora_train.training.distributed_config import DistributedConfig, training_arguments_kwargs
from mora_train.training.eval_callbacks import (
    EVAL_LOSS,
    EarlyStopping,
    best_evaluation,
    evaluation_callbacks,
    stopped_early,
)
from mora_train.training.gather import FinalWeights, collect_final_weights
from mora_train.training.hf_arguments import hf_arguments
from mora_train.training.resilience import NonFiniteLoss, StopOnSignal, StopSignals
from mora_train.training.restarts import TrainingExtras
from mora_train.training.samples import SampleGenerations
from mora_train.training.tracking import LoggingConfig


@dataclass
class TrainResult:
    train_loss: float
    runtime_s: float
    tokens_per_s: float
    steps: int
    log_history: list[dict[str, Any]]
    resumed_from_step: int | None = None
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps skipped (trainer.nonfinite_loss=skip)
    # Engine, replica checksums and (sharded/low-precision engines) rank 0's gathered fp32 trainable weights.
    final_weights: FinalWeights | None = None
    # Evaluation while training (trainer.eval_steps): the lowest eval_loss and its step, the step early stopping
    # ended training at, and the step whose weights training ended with (the best one under trainer.load_best).
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early_at: int | None = None
    weights_step: int | None = None


def training_arguments(
    trainer: TrainerConfig, seed: int, checkpoint_dir: Path, distributed: DistributedConfig | None = None
) -> TrainingArguments:
    """Map the trainer section onto TrainingArguments; accumulation is derived from the global batch.

    Under a multi-process launch each rank gets seed + rank (dropout differs per rank, as it should), while
    data_seed stays `seed` on all of them, so the global batches are the same whatever the world size.
    `distributed` adds the engine's keys (deepspeed=, fsdp=, ddp_*); `trainer.hf` any other field.
    """
    accumulation = trainer.batch_size // (trainer.micro_batch_size * world_size())
    save_steps = trainer.save_steps
    evaluates = trainer.eval_steps > 0  # Trainer then gets the validation set (trainer.train's eval_examples)
    # Keyword form: tests/unit/test_hf_arguments.py reads the field names set here (OWNED_FIELDS must list them).
    args: dict[str, Any] = dict(  # noqa: C408
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=trainer.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=trainer.max_steps if trainer.max_steps > 0 else -1,
        num_train_epochs=float(trainer.num_epochs),
        learning_rate=float(trainer.learning_rate),
        optim=trainer.optim,
        lr_scheduler_type=trainer.lr_scheduler,
        lr_scheduler_kwargs=dict(trainer.lr_scheduler_kwargs),
        warmup_steps=trainer.warmup_steps,
        weight_decay=float(trainer.weight_decay),
        max_grad_norm=float(trainer.max_grad_norm),
        bf16=trainer.precision == "bf16",
        fp16=trainer.precision == "fp16",
        activation_checkpointing=trainer.gradient_checkpointing,
        # Non-reentrant checkpointing lets gradients reach adapters behind frozen embeddings.
        activation_checkpointing_kwargs={"use_reentrant": False} if trainer.gradient_checkpointing else None,
        logging_steps=trainer.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=trainer.save_total_limit,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=trainer.eval_steps if evaluates else None,
        per_device_eval_batch_size=trainer.micro_batch_size,
        prediction_loss_only=True,  # the loss is what is compared; gathering every logit would cost memory
        metric_for_best_model="eval_loss" if evaluates else None,
        greater_is_better=False if evaluates else None,
        load_best_model_at_end=trainer.load_best,
        report_to="none",  # the trackers of logging.report_to are added as explicit callbacks (training.tracking)
        seed=seed + rank(),
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )
    args.update(training_arguments_kwargs(distributed, trainer))
    args.update(hf_arguments(trainer))
    return TrainingArguments(**args)


def train(
    adapter: Adapter,
    tokenizer: Any,
    train_examples: list[dict],
    trainer: TrainerConfig,
    seed: int,
    run_dir: Path,
    resume_from: str | Path | None = None,
    extras: TrainingExtras | None = None,
    distributed: DistributedConfig | None = None,
    logging: LoggingConfig | None = None,
    eval_examples: Sequence[dict] | None = None,
) -> TrainResult:
    """Train; raise RunStopped (with a checkpoint kept) on SIGINT/SIGTERM, a non-finite loss or a full disk.

    `extras`: what trainer.restart / trainer.train_embeddings add (restarts.setup_training_extras);
    `logging` picks the trackers the training log goes to (None: the default, TensorBoard);
    `eval_examples`: the validation set trainer.eval_steps evaluates and trainer.sample_every prompts from."""
    args = training_arguments(trainer, seed, RunDir(run_dir).checkpoints, distributed)
    embeddings = adapter.base_model.get_input_embeddings()
    if trainer.gradient_checkpointing and (embeddings is None or not embeddings.weight.requires_grad):
        # Frozen embeddings give checkpointed blocks inputs without grad; the adapters inside still need it.
        adapter.base_model.enable_input_require_grads()
    signals = StopSignals()
    stop_on_signal = StopOnSignal(signals)
    callbacks = _callbacks(trainer, tokenizer, run_dir, stop_on_signal, extras, logging, eval_examples)
    with adapters_attached(adapter.model):  # transformers refuses a quantized base it does not see adapters on
        hf_trainer = AdapterTrainer(
            model=adapter.model,
            args=args,
            train_dataset=training_rows(train_examples, trainer.max_seq_len, trainer.packing),
            # Evaluated in the training layout (packed or padded): eval_loss then compares with the training loss.
            eval_dataset=(
                training_rows(eval_examples, trainer.max_seq_len, trainer.packing)
                if eval_examples and trainer.eval_steps > 0
                else None
            ),
            data_collator=PadCollator(tokenizer.pad_token_id, flatten=flattens_packed_rows(adapter.base_model)),
            callbacks=callbacks,
            adapter=adapter,
            nonfinite_loss=trainer.nonfinite_loss,
            checkpoint_state=extras.checkpoint_state if extras is not None else None,
            adapter_lr_ratio=trainer.adapter_lr_ratio,
        )
    resumed_from = checkpoint_step(Path(resume_from)) if resume_from else None
    if resume_from:
        saved = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        if _training_had_ended(saved, trainer):
            # Training had finished (the kill came during export). transformers would run one more step here.
            hf_trainer._load_from_checkpoint(str(_ending_checkpoint(saved, Path(resume_from), trainer)))
            return _finished_result(saved, run_dir, resumed_from, trainer, Path(resume_from))
    with signals:
        output = _train_until_stopped(hf_trainer, resume_from)
    if stop_on_signal.stopped_at is not None:
        raise _signal_stop(hf_trainer, signals, stop_on_signal.stopped_at, run_dir)
    return _train_result(hf_trainer, output, trainer, train_examples, run_dir, resumed_from)


def _callbacks(
    trainer: TrainerConfig,
    tokenizer: Any,
    run_dir: Path,
    stop_on_signal: TrainerCallback,
    extras: TrainingExtras | None,
    logging: LoggingConfig | None,
    eval_examples: Sequence[dict] | None,
) -> list[TrainerCallback]:
    """The trackers of logging.report_to, the signal stop, evaluation while training, samples, and what the
    extras add (restarts, embeddings)."""
    trackers = tracking.trainer_callbacks(logging, run_dir)
    callbacks: list[TrainerCallback] = [*trackers, stop_on_signal, *evaluation_callbacks(trainer)]
    if trainer.sample_every > 0 and eval_examples:
        callbacks.append(SampleGenerations(eval_examples, tokenizer, trainer, trackers))
    return callbacks + (extras.callbacks if extras is not None else [])


def _training_had_ended(saved_state: dict[str, Any], trainer: TrainerConfig) -> bool:
    """Whether a checkpoint is the last of a training that had ended: max_steps reached, or early stopping."""
    reached = trainer.max_steps > 0 and saved_state["global_step"] >= trainer.max_steps
    return reached or stopped_early(saved_state, trainer)


def _ending_checkpoint(saved_state: dict[str, Any], last: Path, trainer: TrainerConfig) -> Path:
    """The checkpoint an ended training's weights are: the best one under trainer.load_best, else the last."""
    best = saved_state.get("best_model_checkpoint")
    if trainer.load_best and best:
        candidate = last.parent / Path(best).name  # its folder beside the last one (the run dir may have moved)
        if is_complete(candidate):
            return candidate
    return last


def _train_until_stopped(hf_trainer: AdapterTrainer, resume_from: str | Path | None) -> Any:
    """hf_trainer.train(); a non-finite loss or gradient stops the run with the last good state checkpointed."""
    try:
        return hf_trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteLoss as err:
        kept = hf_trainer.save_last_good_checkpoint()
        raise RunStopped(
            f"training stopped at step {err.step}: the {err.what} is not finite (NaN or Inf). No update was "
            f"applied from it; the last good state is kept in {kept or 'no checkpoint (no step had completed)'}. "
            "Usual fixes: lower trainer.learning_rate, keep trainer.max_grad_norm > 0, prefer trainer.precision="
            "bf16 or fp32 over fp16, check the data; or set trainer.nonfinite_loss=skip to skip such steps. "
            "Then resume",
            exit_code=3,
        ) from None


def _signal_stop(hf_trainer: AdapterTrainer, signals: StopSignals, stopped_at: int, run_dir: Path) -> RunStopped:
    """The stop of a run that SIGINT/SIGTERM ended after a step, its checkpoint saved (exit 128 + the signal)."""
    signum = signals.received or signal.SIGTERM
    checkpoint = RunDir(run_dir).checkpoint(stopped_at)
    return RunStopped(
        f"interrupted by {signal.Signals(signum).name}: stopped after step {stopped_at} of "
        f"{hf_trainer.state.max_steps} and saved checkpoint {checkpoint}. To continue",
        exit_code=128 + int(signum),
    )


def _train_result(
    hf_trainer: AdapterTrainer,
    output: Any,
    trainer: TrainerConfig,
    train_examples: list[dict],
    run_dir: Path,
    resumed_from: int | None,
) -> TrainResult:
    """The finished training's numbers; log_history.json written (rank 0), sharded weights gathered (every rank)."""
    runtime = float(output.metrics.get("train_runtime", 0.0))
    steps_run = hf_trainer.state.global_step - (resumed_from or 0)
    # Tokens this process trained on (the state's counter includes the steps before a resume).
    tokens_seen: float = (hf_trainer.state.num_input_tokens_seen or 0) - getattr(
        hf_trainer, "_initial_num_input_tokens_seen", 0
    )
    if tokens_seen <= 0:  # the counter is 0 on some backends; fall back to what the data holds
        examples_seen = steps_run * trainer.batch_size
        tokens_seen = count_tokens(train_examples) * examples_seen / max(len(train_examples), 1)
    history = list(hf_trainer.state.log_history)
    if is_main_process():
        write_json_atomically(RunDir(run_dir).log_history, history)
    # Every rank: gathers sharded weights onto rank 0 and compares replicas (collectives).
    final_weights = collect_final_weights(hf_trainer, hf_trainer.trained_parameter_names)
    best_step, best_loss = best_evaluation(history)
    stoppers = [c for c in hf_trainer.callback_handler.callbacks if isinstance(c, EarlyStopping)]
    loaded = hf_trainer.state.best_model_checkpoint if trainer.load_best else None
    return TrainResult(
        train_loss=float(output.training_loss),
        runtime_s=runtime,
        tokens_per_s=float(tokens_seen) / runtime if runtime > 0 else 0.0,
        steps=hf_trainer.state.global_step,
        log_history=history,
        resumed_from_step=resumed_from,
        skipped_steps=list(hf_trainer.skipped_steps),
        final_weights=final_weights,
        best_step=best_step,
        best_eval_loss=best_loss,
        stopped_early_at=stoppers[0].stopped_at if stoppers else None,
        weights_step=checkpoint_step(Path(loaded)) if loaded else hf_trainer.state.global_step,
    )


def _finished_result(
    saved_state: dict[str, Any], run_dir: Path, resumed_from: int | None, trainer: TrainerConfig, last: Path
) -> TrainResult:
    """TrainResult of a run whose training had already ended (killed during export), as it was first reported.

    The finished training wrote log_history.json, closing entry (train_loss, train_runtime, ...) included,
    before it exported: that is reused. If it was killed before writing it, the closing entry is rebuilt
    from the last checkpoint's history (train_loss: the mean of the logged losses)."""
    steps = int(saved_state["global_step"])
    history = list(saved_state.get("log_history", []))
    try:
        written = json.loads((RunDir(run_dir).log_history).read_text())
    except (OSError, ValueError):
        written = None
    closing = written[-1] if isinstance(written, list) and written and isinstance(written[-1], dict) else {}
    if "train_loss" in closing and closing.get("step") == steps:
        history = written
    else:
        losses = [h["loss"] for h in history if "loss" in h]
        closing = {
            "train_loss": float(sum(losses) / len(losses)) if losses else float("nan"),
            "train_runtime": 0.0,
            "epoch": history[-1].get("epoch") if history else None,
            "step": steps,
        }
        history = [*history, closing]
        if is_main_process():
            write_json_atomically(RunDir(run_dir).log_history, history)
    runtime = float(closing.get("train_runtime") or 0.0)
    best_step, best_loss = best_evaluation(history)
    return TrainResult(
        train_loss=float(closing["train_loss"]),
        runtime_s=runtime,
        tokens_per_s=float(closing.get("train_tokens_per_second") or 0.0),
        steps=steps,
        log_history=history,
        resumed_from_step=resumed_from,
        best_step=best_step,
        best_eval_loss=best_loss,
        stopped_early_at=steps if stopped_early(saved_state, trainer) else None,
        weights_step=checkpoint_step(_ending_checkpoint(saved_state, last, trainer)),
    )


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = (("loss", "training loss"), (EVAL_LOSS, "validation loss (trainer.eval_steps)"))
    for key, label in curves:
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
    best_step, best_loss = best_evaluation(log_history)
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", label=f"lowest validation loss ({best_loss:.4g})")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomically(fig, path)

"""Train an Adapter with transformers.Trainer (Accelerate underneath; DeepSpeed/FSDP by config)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from mora_train.adapters.base import Adapter
from mora_train.core.errors import MoraTrainError, RunStopped
from mora_train.core.io import save_figure_atomically, write_json_atomically
from mora_train.data.common import PadCollator, count_tokens
from mora_train.models.quantization import adapters_attached
from mora_train.training import tracking
from mora_train.training.checkpoints import (
    STAGING_DIR,
    checkpoint_step,
    is_complete,
    newest_complete_checkpoint,
    publish,
    rotate,
)
from mora_train.training.config import TrainerConfig
from mora_train.training.distributed import is_main_process, rank, world_size
from mora_train.training.distributed_config import DistributedConfig, training_arguments_kwargs
from mora_train.training.gather import FinalWeights, collect_final_weights, gather_trainable_state
from mora_train.training.hf_arguments import hf_arguments
from mora_train.training.resilience import (
    NonFiniteLoss,
    StopOnSignal,
    StopSignals,
    format_bytes,
    free_bytes,
    is_disk_full,
)
from mora_train.training.restarts import TrainingExtras
from mora_train.training.tracking import LoggingConfig

log = logging.getLogger(__name__)


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


class AdapterTrainer(Trainer):
    """transformers.Trainer with crash-safe checkpoints and a guard against non-finite updates.

    * Checkpoints hold only the adapter's weights for lora/mora (MBs, not the base model), and no pickled
      TrainingArguments. Each is written to checkpoints/.staging/, marked complete, then renamed into place
      (mora_train.training.checkpoints), so resume never meets a half-written one.
    * A non-finite loss or gradient norm is caught before the optimizer step that would apply it:
      nonfinite_loss="stop" raises NonFiniteLoss, "skip" drops that step's gradients and goes on.
    """

    def __init__(
        self,
        *args: Any,
        adapter: Adapter,
        nonfinite_loss: str = "stop",
        checkpoint_state: list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        # Extra state saved into / loaded from every checkpoint beside the adapter (objects with save(dir), load(dir)),
        # e.g. the base weights that ReMoRA/ReLoRA restarts merged into (mora_train.training.restarts).
        self.checkpoint_state = list(checkpoint_state or [])
        self.nonfinite_loss = nonfinite_loss
        self.skipped_steps: list[int] = []
        self._bad_loss: torch.Tensor | None = None  # any non-finite micro-batch loss in the current step
        self._staging_root: Path | None = None  # set while the stock checkpoint code writes into staging
        # Everything that trains (the adapter, plus embeddings with trainer.train_embeddings), named before the
        # engine wraps or shards the model; the names stay valid after.
        self.trained_parameter_names = [n for n, p in adapter.model.named_parameters() if p.requires_grad]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # The live trained weights are shards ([0]-shaped under ZeRO-3) or bf16 copies: gather the fp32
            # trained weights alone onto rank 0 (a collective: every rank is here), never the frozen base.
            state = gather_trainable_state(self, self.trained_parameter_names)
            self._save(output_dir, state_dict=state)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint holds what the method trains (Adapter.save: adapter weights, or every weight for full
        fine-tuning), the extra checkpoint state, and the TrainingArguments as JSON (not the stock pickle)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        # Typed optional, but TrainingArguments.__post_init__ replaced a None output_dir ("trainer_output").
        assert output_dir is not None
        os.makedirs(output_dir, exist_ok=True)
        self.adapter.save(Path(output_dir), state_dict=state_dict)
        for extra in self.checkpoint_state:
            extra.save(Path(output_dir))
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:
            raise MoraTrainError(
                "resuming a run under FSDP is not supported (its live weights are shards); "
                "resume under DDP (distributed=none/ddp) or DeepSpeed (distributed=zero2/zero3)"
            )
        self.adapter.load_weights(Path(resume_from_checkpoint))
        for extra in self.checkpoint_state:
            extra.load(Path(resume_from_checkpoint))

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The stock checkpoint (weights, optimizer, scheduler, RNG, trainer state), written atomically."""
        checkpoints_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        staged = checkpoints_dir / STAGING_DIR / f"checkpoint-{step}"
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # cleared before any rank writes its rng_state_N.pth into it
        self._staging_root = staged.parent
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            disk_full, free = is_disk_full(err, staged), free_bytes(checkpoints_dir)
            if self.args.should_save:
                shutil.rmtree(staged.parent, ignore_errors=True)  # the partial checkpoint (and .staging itself)
            if not disk_full:
                raise
            newest = newest_complete_checkpoint(checkpoints_dir)
            raise RunStopped(
                f"no space left on the disk holding {checkpoints_dir} while saving the checkpoint of step {step} "
                f"({format_bytes(free)} free; {type(err).__name__}: {err}). The partial checkpoint was removed and "
                f"the completed ones are intact (newest: {newest or 'none'}). Free some space, or move the run dir "
                "to a bigger disk, and resume",
                exit_code=4,
            ) from err
        finally:
            self._staging_root = None
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # every rank's files (e.g. rng_state_N.pth) are in staging
        if self.args.should_save:
            info = {"step": step, **self.adapter.identity_now()}
            publish(staged, checkpoints_dir / staged.name, info)
            rotate(checkpoints_dir, self.args.save_total_limit)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def save_last_good_checkpoint(self) -> Path | None:
        """After NonFiniteLoss: checkpoint the state before the bad step (weights and optimizer untouched by it)."""
        assert self.args.output_dir is not None  # typed optional; TrainingArguments.__post_init__ filled it in
        checkpoints_dir = Path(self.args.output_dir)
        existing = checkpoints_dir / f"checkpoint-{self.state.global_step}"
        if is_complete(existing):
            return existing
        finite = all(torch.isfinite(p).all() for p in self.adapter.trainable_parameters().values())
        if self.state.global_step == 0 or not finite:
            return newest_complete_checkpoint(checkpoints_dir)
        self._save_checkpoint(self.model_wrapped, trial=None)
        return existing

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Accumulated on the device: one host sync per optimizer step (in _get_grad_norm), not per micro-batch.
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        return loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        # Called once per optimizer step, after clipping and just before optimizer.step().
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._guard_nonfinite(model, grad_norm)
        return grad_norm

    def _guard_nonfinite(self, model: torch.nn.Module, grad_norm: Any) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        device = bad_loss.device if bad_loss is not None else self.args.device
        flags = torch.zeros(2, dtype=torch.int32, device=device)
        if bad_loss is not None:
            flags[0] = bad_loss.to(torch.int32)
        # Under fp16 the gradient scaler expects inf gradients now and then and skips those steps itself.
        if grad_norm is not None and not self.args.fp16:
            flags[1] = (~torch.isfinite(torch.as_tensor(grad_norm, device=device))).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every process must take the same decision
        bad_loss_seen, bad_grad_seen = flags.tolist()
        if not (bad_loss_seen or bad_grad_seen):
            return
        step = self.state.global_step + 1
        what = "loss" if bad_loss_seen else "gradient norm"
        if self.nonfinite_loss != "skip":
            raise NonFiniteLoss(step, what)
        for param in model.parameters():
            param.grad = None  # the optimizer leaves parameters without gradients (and their moments) alone
        self.skipped_steps.append(step)
        log.warning("step %d: non-finite %s; skipped this step (trainer.nonfinite_loss=skip)", step, what)


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
) -> TrainResult:
    """Train; raise RunStopped (with a checkpoint kept) on SIGINT/SIGTERM, a non-finite loss or a full disk.

    `extras`: what trainer.restart / trainer.train_embeddings add (restarts.setup_training_extras);
    `logging` picks the trackers the training log goes to (None: the default, TensorBoard)."""
    args = training_arguments(trainer, seed, run_dir / "checkpoints", distributed)
    model = adapter.model
    embeddings = adapter.base_model.get_input_embeddings()
    if trainer.gradient_checkpointing and (embeddings is None or not embeddings.weight.requires_grad):
        # Frozen embeddings give checkpointed blocks inputs without grad; the adapters inside still need it.
        adapter.base_model.enable_input_require_grads()
    signals = StopSignals()
    stop_on_signal = StopOnSignal(signals)
    callbacks = [*tracking.trainer_callbacks(logging, run_dir), stop_on_signal]  # logging.report_to
    if extras is not None:
        callbacks += extras.callbacks
    with adapters_attached(model):  # transformers refuses a quantized base it does not see adapters on
        hf_trainer = AdapterTrainer(
            model=model,
            args=args,
            train_dataset=train_examples,
            data_collator=PadCollator(tokenizer.pad_token_id),
            callbacks=callbacks,
            adapter=adapter,
            nonfinite_loss=trainer.nonfinite_loss,
            checkpoint_state=extras.checkpoint_state if extras is not None else None,
        )
    resumed_from = checkpoint_step(Path(resume_from)) if resume_from else None
    if resume_from and trainer.max_steps > 0:
        saved = json.loads((Path(resume_from) / "trainer_state.json").read_text())
        if saved["global_step"] >= trainer.max_steps:
            # Training had finished (the kill came during export). transformers would run one more step here.
            hf_trainer._load_from_checkpoint(str(resume_from))
            return _finished_result(saved, run_dir, resumed_from)
    with signals:
        try:
            output = hf_trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
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
    if stop_on_signal.stopped_at is not None:
        signum = signals.received or signal.SIGTERM
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{stop_on_signal.stopped_at}"
        raise RunStopped(
            f"interrupted by {signal.Signals(signum).name}: stopped after step {stop_on_signal.stopped_at} of "
            f"{hf_trainer.state.max_steps} and saved checkpoint {checkpoint}. To continue",
            exit_code=128 + int(signum),
        )
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
        write_json_atomically(run_dir / "log_history.json", history)
    # Every rank: gathers sharded weights onto rank 0 and compares replicas (collectives).
    final_weights = collect_final_weights(hf_trainer, hf_trainer.trained_parameter_names)
    return TrainResult(
        train_loss=float(output.training_loss),
        runtime_s=runtime,
        tokens_per_s=float(tokens_seen) / runtime if runtime > 0 else 0.0,
        steps=hf_trainer.state.global_step,
        log_history=history,
        resumed_from_step=resumed_from,
        skipped_steps=list(hf_trainer.skipped_steps),
        final_weights=final_weights,
    )


def _finished_result(saved_state: dict[str, Any], run_dir: Path, resumed_from: int | None) -> TrainResult:
    """TrainResult of a run whose training had already ended (killed during export), as it was first reported.

    The finished training wrote log_history.json, closing entry (train_loss, train_runtime, ...) included,
    before it exported: that is reused. If it was killed before writing it, the closing entry is rebuilt
    from the last checkpoint's history (train_loss: the mean of the logged losses)."""
    steps = int(saved_state["global_step"])
    history = list(saved_state.get("log_history", []))
    try:
        written = json.loads((run_dir / "log_history.json").read_text())
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
            write_json_atomically(run_dir / "log_history.json", history)
    runtime = float(closing.get("train_runtime") or 0.0)
    return TrainResult(
        train_loss=float(closing["train_loss"]),
        runtime_s=runtime,
        tokens_per_s=float(closing.get("train_tokens_per_second") or 0.0),
        steps=steps,
        log_history=history,
        resumed_from_step=resumed_from,
    )


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomically(fig, path)

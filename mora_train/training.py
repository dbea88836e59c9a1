"""Train an Adapter with transformers.Trainer (Accelerate underneath; DeepSpeed/FSDP by config)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback

from mora_train.adapters.base import Adapter, write_json_atomically
from mora_train.data.common import PadCollator, count_tokens

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    train_loss: float
    runtime_s: float
    tokens_per_s: float
    steps: int
    log_history: list[dict[str, Any]]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(trainer_cfg: DictConfig, seed: int, checkpoint_dir: Path) -> TrainingArguments:
    """Map our trainer config onto TrainingArguments; accumulation is derived from the global batch."""
    accumulation = trainer_cfg.batch_size // (trainer_cfg.micro_batch_size * world_size())
    save_steps = trainer_cfg.save_steps
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=trainer_cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=trainer_cfg.max_steps if trainer_cfg.max_steps > 0 else -1,
        num_train_epochs=float(trainer_cfg.num_epochs),
        learning_rate=float(trainer_cfg.learning_rate),
        lr_scheduler_type=trainer_cfg.lr_scheduler,
        warmup_steps=trainer_cfg.warmup_steps,
        weight_decay=float(trainer_cfg.weight_decay),
        max_grad_norm=float(trainer_cfg.max_grad_norm),
        bf16=trainer_cfg.precision == "bf16",
        fp16=trainer_cfg.precision == "fp16",
        activation_checkpointing=trainer_cfg.gradient_checkpointing,
        # Non-reentrant checkpointing lets gradients reach adapters behind frozen embeddings.
        activation_checkpointing_kwargs={"use_reentrant": False} if trainer_cfg.gradient_checkpointing else None,
        logging_steps=trainer_cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=trainer_cfg.save_total_limit,
        report_to="none",  # TensorBoard is added as an explicit callback writing into the run dir
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )


class AdapterTrainer(Trainer):
    """Trainer whose checkpoints hold only the adapter's weights for lora/mora (MBs, not the base model)."""

    def __init__(self, *args: Any, adapter: Adapter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.adapter.name == "full":
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.adapter.save(Path(output_dir))
        # JSON, not the pickled TrainingArguments the stock Trainer writes.
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.adapter.name == "full":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.adapter.load_weights(Path(resume_from_checkpoint))


def train(
    adapter: Adapter,
    tokenizer: Any,
    train_dataset: list[dict],
    trainer_cfg: DictConfig,
    seed: int,
    run_dir: Path,
    resume_from_checkpoint: str | None = None,
) -> TrainResult:
    args = training_arguments(trainer_cfg, seed, run_dir / "checkpoints")
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(run_dir / "tensorboard")
    model = adapter.model
    if trainer_cfg.gradient_checkpointing and adapter.name != "full":
        adapter.base_model.enable_input_require_grads()
    trainer = AdapterTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        # Lets the token counter skip padding in packed batches, which carry no attention mask.
        processing_class=tokenizer,
        callbacks=[tensorboard],
        adapter=adapter,
    )
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    runtime = float(output.metrics.get("train_runtime", 0.0))
    tokens_seen = trainer.state.num_input_tokens_seen or 0
    if not tokens_seen:  # the counter is 0 on some backends; fall back to what the data holds
        examples_seen = trainer.state.global_step * trainer_cfg.batch_size
        tokens_seen = count_tokens(train_dataset) * examples_seen / max(len(train_dataset), 1)
    history = list(trainer.state.log_history)
    write_json_atomically(run_dir / "log_history.json", history)
    return TrainResult(
        train_loss=float(output.training_loss),
        runtime_s=runtime,
        tokens_per_s=float(tokens_seen) / runtime if runtime > 0 else 0.0,
        steps=trainer.state.global_step,
        log_history=history,
    )


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_json(path: Path, data: Any) -> None:
    write_json_atomically(path, json.loads(json.dumps(data, default=str)))

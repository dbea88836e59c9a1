"""The `trainer` section: steps, batch, optimiser, schedule, precision, checkpoints, restarts, and any other
field of transformers' TrainingArguments through `trainer.hf`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from mora_train.config.schema import Section, setting

Precision = Literal["fp32", "bf16", "fp16"]
RestartSchedule = Literal["jagged", "cosine_restarts"]


class RestartConfig(Section):
    """Periodic merge-and-restart (ReMoRA with adapter=mora, ReLoRA with adapter=lora)."""

    every_steps: int = setting(default=0, help="merge ΔW into the base and restart the adapter every N steps; 0: never")
    warmup_steps: int = setting(default=0, help="learning-rate re-warm-up after each restart, in steps")
    lr_schedule: RestartSchedule = setting(
        default="jagged", help="jagged: the trainer's schedule times a re-warm-up; cosine_restarts: a cosine per cycle"
    )
    min_lr_ratio: float = setting(
        default=0.1, help="cosine_restarts: the lowest learning rate of a cycle, as a share of the peak"
    )
    mora_types: list[str | int] | None = setting(
        default=None, help="MoRA operator types cycled at each restart (e.g. [1, 2]); null: sharing <-> grouping"
    )

    def check(self, prefix: str) -> list[str]:
        problems = [
            f"`{prefix}.{key}={value!r}` must be a non-negative integer"
            for key, value in (("every_steps", self.every_steps), ("warmup_steps", self.warmup_steps))
            if value < 0
        ]
        if self.every_steps > 0 and self.warmup_steps >= self.every_steps:
            problems.append(
                f"`{prefix}.warmup_steps={self.warmup_steps}` must be smaller than `{prefix}.every_steps="
                f"{self.every_steps}` (the re-warm-up happens inside each cycle)"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"`{prefix}.min_lr_ratio={self.min_lr_ratio!r}` must be a number in [0, 1]")
        return problems


class TrainerConfig(Section):
    max_steps: int = setting(default=200, help="optimizer steps; 0 or less: train num_epochs epochs instead")
    num_epochs: float = setting(default=1, help="epochs over the training data when max_steps <= 0")
    learning_rate: float = setting(default=2.0e-4, help="peak learning rate")
    adapter_lr_ratio: float | None = setting(
        default=None, help="LoRA+: B's learning rate over A's (e.g. 16; adapter=lora only); null: one learning rate"
    )
    batch_size: int = setting(default=8, help="examples per optimizer step, over all processes")
    micro_batch_size: int = setting(
        default=8, help="examples per forward pass per process (the rest is gradient accumulation)"
    )
    optim: str = setting(
        default="adamw_torch",
        help="transformers optimizer name: adamw_torch, adafactor, adamw_8bit, paged_adamw_8bit, ...",
    )
    lr_scheduler: str = setting(
        default="cosine", help="transformers scheduler name: linear, cosine, constant, cosine_with_min_lr, ..."
    )
    lr_scheduler_kwargs: dict[str, Any] = setting(
        factory=dict, help="the scheduler's own arguments, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr"
    )
    warmup_steps: int = setting(default=5, help="linear warm-up steps")
    weight_decay: float = setting(default=0.0, help="AdamW weight decay")
    max_grad_norm: float = setting(default=1.0, help="gradient clipping norm")
    max_seq_len: int = setting(default=256, help="longest tokenized example (task.too_long says what happens beyond)")
    packing: bool = setting(
        default=False,
        help="pack examples into rows of up to max_seq_len tokens, each attending only to itself (batch sizes "
        "then count rows); needs model.attn_implementation eager, sdpa or flash_attention_2",
    )
    precision: Precision = setting(default="fp32", help="training precision: fp32, bf16 (CPU or GPU) or fp16 (GPU)")
    gradient_checkpointing: bool = setting(
        default=False, help="recompute activations in the backward pass to save memory"
    )
    logging_steps: int = setting(default=5, help="log loss and learning rate every N steps")
    save_steps: int = setting(default=50, help="checkpoint every N steps; 0: only at the end")
    save_total_limit: int | None = setting(default=2, help="checkpoints kept (the newest always); null: all")
    resume: str | bool = setting(
        default="auto",
        help="auto: continue from the run dir's last checkpoint; true/false; or a checkpoint or run dir path",
    )
    nonfinite_loss: Literal["stop", "skip"] = setting(
        default="stop", help="on a NaN/inf loss: stop (keep the last good checkpoint) or skip the step"
    )
    train_embeddings: bool = setting(
        default=False, help="also train the input embeddings and the LM head (pretraining)"
    )
    restart: RestartConfig = setting(factory=RestartConfig, help="ReMoRA / ReLoRA merge-and-restart")
    # Evaluation while training: the validation set is task.val_size carved from the training set, else the task's
    # held-out set (task.data.eval); checked against the task by tasks.validation.validation_problems.
    eval_steps: int = setting(
        default=0, help="evaluate the validation set every N steps (eval_loss to every tracker); 0: never"
    )
    early_stopping_patience: int = setting(
        default=0, help="stop after N evaluations in a row without a better eval_loss; 0: never stop early"
    )
    early_stopping_threshold: float = setting(
        default=0.0, help="how much lower eval_loss must be to count as better, for early stopping"
    )
    load_best: bool = setting(
        default=False, help="end on the checkpoint with the lowest eval_loss: adapter/ and merged/ hold that step"
    )
    sample_every: int = setting(
        default=0, help="every N steps, log greedy generations of a few validation prompts as text; 0: never"
    )
    num_samples: int = setting(default=3, help="how many validation prompts trainer.sample_every generates from")
    sample_max_new_tokens: int = setting(
        default=64, help="generation cap of trainer.sample_every (the reference's length when shorter)"
    )
    hf: dict[str, Any] = setting(
        factory=dict, help="any other transformers TrainingArguments field, e.g. +trainer.hf.neftune_noise_alpha=5"
    )

    def check(self, prefix: str) -> list[str]:
        problems = self._batch_problems(prefix)
        if self.learning_rate <= 0:
            problems.append(f"`{prefix}.learning_rate={self.learning_rate:g}` must be positive")
        if self.adapter_lr_ratio is not None and self.adapter_lr_ratio <= 0:
            problems.append(f"`{prefix}.adapter_lr_ratio={self.adapter_lr_ratio:g}` must be positive, or null")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            problems.append(f"set `{prefix}.max_steps` or `{prefix}.num_epochs` to a positive number")
        for key, minimum in (("warmup_steps", 0), ("max_seq_len", 8), ("logging_steps", 1), ("save_steps", 0)):
            value = getattr(self, key)
            if value < minimum:
                problems.append(f"`{prefix}.{key}={value}` must be at least {minimum}")
        problems += precision_problems(self.precision, prefix)
        if isinstance(self.resume, str) and self.resume != "auto" and not Path(self.resume).expanduser().exists():
            problems.append(
                f"`{prefix}.resume={self.resume}` is neither auto, true, false nor an existing path; give a checkpoint "
                "folder (RUN_DIR/checkpoints/checkpoint-N), a run dir, or trainer.resume=auto"
            )
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(
                f"`{prefix}.save_total_limit={self.save_total_limit}` must be at least 1 (the newest checkpoint is "
                "what resume needs), or null to keep every checkpoint"
            )
        return problems + self._evaluation_problems(prefix)

    @property
    def evaluates(self) -> bool:
        """Whether training reads a validation set (evaluations or generated samples)."""
        return self.eval_steps > 0 or self.sample_every > 0

    def _evaluation_problems(self, prefix: str) -> list[str]:
        """eval_steps, early stopping, load_best and samples: ranges, and what each needs of the others."""
        minimums = (("eval_steps", 0), ("early_stopping_patience", 0), ("sample_every", 0), ("num_samples", 1))
        problems = [
            f"`{prefix}.{key}={getattr(self, key)}` must be at least {minimum}"
            for key, minimum in (*minimums, ("sample_max_new_tokens", 1))
            if getattr(self, key) < minimum
        ]
        if self.early_stopping_threshold < 0:
            problems.append(f"`{prefix}.early_stopping_threshold={self.early_stopping_threshold}` must be at least 0")
        every = self.eval_steps
        fix = f"set {prefix}.eval_steps=N (the validation set: task.data.eval, or task.val_size=0.1 carved from train)"
        if self.early_stopping_patience > 0 and every <= 0:
            problems.append(
                f"`{prefix}.early_stopping_patience={self.early_stopping_patience}` counts evaluations without a "
                f"better eval_loss, and `{prefix}.eval_steps=0` runs no evaluation during training; {fix}"
            )
        if self.load_best and every <= 0:
            problems.append(
                f"`{prefix}.load_best=true` picks the checkpoint with the lowest eval_loss, and "
                f"`{prefix}.eval_steps=0` runs no evaluation during training; {fix}"
            )
        elif self.load_best and (self.save_steps <= 0 or self.save_steps % every):
            problems.append(
                f"`{prefix}.load_best=true` needs a checkpoint at evaluation steps, and `{prefix}.save_steps="
                f"{self.save_steps}` is not a multiple of `{prefix}.eval_steps={every}` (transformers requires it): "
                f"set {prefix}.save_steps={every} or another multiple of it"
            )
        if self.load_best and self.save_total_limit == 1:
            problems.append(
                f"`{prefix}.save_total_limit=1` with `{prefix}.load_best=true`: the best checkpoint and the newest "
                f"(which resume continues from) are both kept; set {prefix}.save_total_limit=2 or more (or null)"
            )
        return problems

    def _batch_problems(self, prefix: str) -> list[str]:
        batch, micro = self.batch_size, self.micro_batch_size
        world = int(os.environ.get("WORLD_SIZE", "1"))
        problems = []
        if batch < 1:
            problems.append(f"`{prefix}.batch_size={batch}` must be at least 1")
        if micro < 1:
            problems.append(f"`{prefix}.micro_batch_size={micro}` must be at least 1")
        if problems:
            return problems
        if micro > batch:
            problems.append(
                f"`{prefix}.micro_batch_size={micro}` is larger than `{prefix}.batch_size={batch}`; "
                f"set {prefix}.micro_batch_size to a divisor of {batch}"
            )
        elif batch % (micro * world):
            what = (
                f"micro_batch_size x {world} processes = {micro * world}" if world > 1 else f"micro_batch_size={micro}"
            )
            problems.append(
                f"`{prefix}.batch_size={batch}` is not a multiple of {what}; gradient accumulation needs "
                "a whole number of micro-batches per step: change either value"
            )
        return problems


def precision_problems(precision: str, prefix: str = "trainer") -> list[str]:
    """fp16 needs a GPU; bf16 needs a GPU that supports it (or the CPU)."""
    if precision == "fp16" and not torch.cuda.is_available():
        return [
            (
                f"`{prefix}.precision=fp16` needs a CUDA GPU and none is visible; use {prefix}.precision=bf16 "
                f"(runs on CPU) or {prefix}.precision=fp32"
            )
        ]
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return [f"`{prefix}.precision=bf16` is not supported by this GPU; use {prefix}.precision=fp16 or fp32"]
    return []

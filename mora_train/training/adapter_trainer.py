"""transformers.Trainer for an Adapter: checkpoints complete or absent, and no update from a non-finite step."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME

from mora_train.adapters.base import Adapter
from mora_train.adapters.capabilities import factor_pair
from mora_train.core.errors import MoraTrainError, RunStopped
from mora_train.core.run_dir import RunDir
from mora_train.training.checkpoints import (
    STAGING_DIR,
    is_complete,
    newest_complete_checkpoint,
    publish,
    rotate,
)
from mora_train.training.gather import gather_trainable_state
from mora_train.training.resilience import NonFiniteLoss, format_bytes, free_bytes, is_disk_full

log = logging.getLogger(__name__)


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
        adapter_lr_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        self.adapter_lr_ratio = adapter_lr_ratio  # LoRA+: B's learning rate over A's (None: one rate)
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

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' optimizer; with trainer.adapter_lr_ratio (LoRA+), the adapter's own, whose parameter
        groups give B `ratio` times A's learning rate (the scheduler scales every group alike, restarts too)."""
        if self.adapter_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        # The model argument only matters to optimizers LoRA+ cannot group (GaLore, LOMO: they take the model whole).
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args)
        kwargs = {**optimizer_kwargs, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay}
        self.optimizer = factor_pair(self.adapter).factor_pair_optimizer(optimizer_cls, kwargs, self.adapter_lr_ratio)
        return self.optimizer

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
        staged = checkpoints_dir / STAGING_DIR / RunDir.checkpoint_name(step)
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
        self._record_best_checkpoint(checkpoints_dir, staged)  # every rank: each loads it under trainer.load_best
        if self.args.should_save:
            info = {"step": step, **self.adapter.identity_now()}
            publish(staged, checkpoints_dir / staged.name, info)
            best = self.state.best_model_checkpoint
            rotate(checkpoints_dir, self.args.save_total_limit, keep=Path(best) if best else None)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()

    def _record_best_checkpoint(self, checkpoints_dir: Path, staged: Path) -> None:
        """The best step's checkpoint under its final name, in the state and in the staged trainer_state.json.

        The stock code looked for it under the staging folder it saved into (found only when the best step is
        this one, under a name that is gone once published); resume and load_best need the published one."""
        best = self.state.best_global_step
        if not best:
            return
        final = checkpoints_dir / RunDir.checkpoint_name(best)
        if best != self.state.global_step and not is_complete(final):
            return  # the best step was not checkpointed (early stopping without trainer.load_best)
        self.state.best_model_checkpoint = str(final)
        if self.args.should_save:
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        new_best = super()._determine_best_metric(metrics, trial)
        if new_best and self.args.load_best_model_at_end and self.args.save_strategy == "steps":
            # Checkpoint every new best (not only those on a save step), so load_best ends on the lowest eval_loss.
            self.control.should_save = True
        return new_best

    def _load_best_model(self) -> None:
        """trainer.load_best: the best checkpoint's weights, loaded as resume loads them (adapter and extra state)."""
        best = self.state.best_model_checkpoint
        assert best is not None  # Trainer calls this only when it has one
        log.info("loading the best checkpoint %s (eval_loss %s; trainer.load_best=true)", best, self.state.best_metric)
        self._load_from_checkpoint(best)

    def save_last_good_checkpoint(self) -> Path | None:
        """After NonFiniteLoss: checkpoint the state before the bad step (weights and optimizer untouched by it)."""
        assert self.args.output_dir is not None  # typed optional; TrainingArguments.__post_init__ filled it in
        checkpoints_dir = Path(self.args.output_dir)
        existing = checkpoints_dir / RunDir.checkpoint_name(self.state.global_step)
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

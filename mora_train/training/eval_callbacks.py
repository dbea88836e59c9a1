"""Evaluation while training: early stopping on the validation loss, and what a run's trainer state says of it.

Trainer evaluates the validation set every `trainer.eval_steps` steps (eval_loss, lower is better:
TrainingArguments' metric_for_best_model) and records the best value and step in its TrainerState. Early
stopping is transformers' EarlyStoppingCallback with three additions a resumable run needs:

* the patience counter of a resumed run is the one its checkpoint saved (TrainerState.stateful_callbacks,
  written into every checkpoint's trainer_state.json), while the patience and threshold are this run's
  settings (transformers' own restore, restore_callback_states_from_checkpoint, would take the checkpoint's);
* the step that ends training early is checkpointed (a kill during the export then resumes into a finished
  run, not into more training);
* the step it stopped at is kept, for the run's record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import EarlyStoppingCallback

from mora_train.training.config import TrainerConfig

log = logging.getLogger(__name__)

EVAL_LOSS = "eval_loss"  # the metric Trainer compares (TrainingArguments.metric_for_best_model)


class EarlyStopping(EarlyStoppingCallback):
    """Stop after `early_stopping_patience` evaluations in a row without an eval_loss lower than the best by more
    than `early_stopping_threshold`; the counter survives a resume."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0) -> None:
        # The same arguments as the parent: transformers rebuilds stateful callbacks from state()["args"].
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.stopped_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Not the parent's: it warns when load_best_model_at_end is off, which is a supported choice here
        # (trainer.load_best=false: the run ends on its last step, evaluated or not).
        if state.global_step > 0:
            self.early_stopping_patience_counter = saved_patience_counter(state.stateful_callbacks)
            if self.early_stopping_patience_counter:
                log.info(
                    "early stopping: %d of %d evaluations without a better eval_loss before the resumed step %d",
                    self.early_stopping_patience_counter,
                    self.early_stopping_patience,
                    state.global_step,
                )

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        super().on_evaluate(args, state, control, metrics, **kwargs)
        ran_out = self.early_stopping_patience_counter >= self.early_stopping_patience
        if ran_out and self.stopped_at is None and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            log.warning(
                "early stopping at step %d: %d evaluations in a row without an eval_loss lower than the best (%s) "
                "by more than %g (trainer.early_stopping_patience, trainer.early_stopping_threshold)",
                state.global_step,
                self.early_stopping_patience_counter,
                state.best_metric,
                self.early_stopping_threshold or 0.0,
            )
            if args.save_strategy == "steps":
                control.should_save = True


def evaluation_callbacks(trainer: TrainerConfig) -> list[Any]:
    """The callbacks `trainer.early_stopping_*` adds (generated samples: mora_train.training.samples)."""
    if trainer.eval_steps <= 0 or trainer.early_stopping_patience <= 0:
        return []
    return [EarlyStopping(trainer.early_stopping_patience, trainer.early_stopping_threshold)]


def engine_problems(trainer: TrainerConfig, engine: str | None) -> list[str]:
    """trainer.load_best and trainer.sample_every need the whole trained weights in each process, which a sharding
    engine (DeepSpeed, FSDP) does not hold; evaluation and early stopping work under every engine."""
    if engine is None:
        return []
    asked = [f"trainer.{key}" for key, on in (("load_best", trainer.load_best), ("sample_every", trainer.sample_every))]
    return [
        f"`{key}` loads or generates with the whole trained weights in one process, which distributed={engine} "
        f"keeps sharded or wrapped: use distributed=none or ddp, or drop {key} (trainer.eval_steps and early "
        "stopping work under every engine)"
        for key, on in zip(asked, (trainer.load_best, trainer.sample_every > 0), strict=True)
        if on
    ]


def saved_patience_counter(stateful_callbacks: Any) -> int:
    """The early-stopping counter a trainer state holds (0 when it holds none)."""
    saved = (stateful_callbacks or {}).get(EarlyStopping.__name__) if isinstance(stateful_callbacks, dict) else None
    if isinstance(saved, list):  # transformers keeps a list when several callbacks share the class
        saved = saved[-1] if saved else None
    attributes = saved.get("attributes") if isinstance(saved, dict) else None
    counter = attributes.get("early_stopping_patience_counter") if isinstance(attributes, dict) else None
    return int(counter) if isinstance(counter, int) else 0


def stopped_early(saved_state: Mapping[str, Any], trainer: TrainerConfig) -> bool:
    """Whether a checkpoint's trainer state (trainer_state.json) is that of a run early stopping had ended."""
    patience = trainer.early_stopping_patience
    if trainer.eval_steps <= 0 or patience <= 0:
        return False
    return saved_patience_counter(saved_state.get("stateful_callbacks")) >= patience


def best_evaluation(log_history: Sequence[Mapping[str, Any]]) -> tuple[int | None, float | None]:
    """(step, eval_loss) of the lowest eval_loss logged (its first step, as Trainer keeps its best); (None, None)
    when nothing was evaluated."""
    points = [
        (int(entry["step"]), float(entry[EVAL_LOSS]))
        for entry in log_history
        if isinstance(entry.get(EVAL_LOSS), (int, float)) and isinstance(entry.get("step"), int)
    ]
    finite = [point for point in points if math.isfinite(point[1])]
    if not finite:
        return None, None
    return min(finite, key=lambda point: point[1])

"""The declared schema of metrics.json, read and written only through this module.

A run's record has three parts:

* identity: `mode` (eval runs only), `task`, `adapter`, `rank` (null for methods without one),
  `adapter_config` (the method's own description), `quantization` (model.quantization of the base),
  `primary_metric` and `greater_is_better` — the metric the task declares (mora_train.tasks) and its
  direction, so that every reader (summary line, sweep report, sweep optimisers) ranks runs the same way
  without knowing the task;
* results: the task's own metrics (`metrics_of`) and the training results in TRAINING_KEYS;
* `run`: bookkeeping of how the job ran (engine, world size, resume step, skipped steps, memory,
  wall time; with evaluation while training the validation set, `early_stopped_at_step` and `weights_step`,
  the step whose weights were exported: the best one under trainer.load_best), never taken for a metric;
* `lm_eval` (only with `eval.backend=lm_eval` or `both`): lm-evaluation-harness's results, its version
  and the settings it ran with (mora_train.evaluation.lm_harness). Its numbers count as metrics of the run
  under flat names `lm_eval/TASK/METRIC` (`lm_eval_metrics`), which `primary_metric` may name.
"""

from __future__ import annotations

import math
from typing import Any

IDENTITY_KEYS = (
    "mode",
    "task",
    "adapter",
    "rank",
    "adapter_config",
    "quantization",
    "checkpoint",
    "evaluated",
    "primary_metric",
    "greater_is_better",
)
# Comparable across runs of any task; shown by the report beside the task's metrics.
TRAINING_KEYS = (
    "train_loss",
    "final_logged_loss",
    "train_steps",
    "trainable_params",
    "total_params",
    "train_runtime_s",
    "tokens_per_s",
    "merge_max_abs_diff",
    "merge_tolerance",
    # merged/ in a coarser dtype than the model computed in: the merge checked before that cast (else null)
    "merge_before_cast_max_abs_diff",
    "merge_before_cast_tolerance",
    # quantized base: max |logit difference| between its quantized kernels and its de-quantized weights
    "quantized_kernel_max_abs_diff",
    "quantized_kernel_tolerance",
    # evaluation while training (trainer.eval_steps; else null): the lowest validation loss and its step
    "best_eval_loss",
    "best_step",
)
RUN_SECTION = "run"
LM_EVAL_SECTION = "lm_eval"
LM_EVAL_PREFIX = "lm_eval/"


def make_record(
    identity: dict[str, Any],
    primary_metric: str,
    greater_is_better: bool,
    task_metrics: dict[str, Any],
    training: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    lm_eval: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A metrics.json record from its parts; refuses task metrics whose names the schema reserves."""
    reserved = set(IDENTITY_KEYS) | set(TRAINING_KEYS) | {RUN_SECTION, LM_EVAL_SECTION}
    clash = sorted(reserved & set(task_metrics))
    if clash:
        raise ValueError(f"task metrics {clash} use names metrics.json reserves for run identity or bookkeeping")
    unknown = sorted(set(training or {}) - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(f"{unknown} are not training results of the metrics.json schema (TRAINING_KEYS)")
    return {
        **identity,
        "primary_metric": primary_metric,
        "greater_is_better": bool(greater_is_better),
        **task_metrics,
        **(training or {}),
        RUN_SECTION: dict(run or {}),
        **({LM_EVAL_SECTION: lm_eval} if lm_eval is not None else {}),
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def primary_value(record: dict[str, Any]) -> float | None:
    """The value of the record's declared primary metric (None when absent or not a number)."""
    name = record.get("primary_metric")
    if not name:
        return None
    return _number(record[name]) if name in record else _number(lm_eval_metrics(record).get(name))


def greater_is_better(record: dict[str, Any]) -> bool:
    """The declared direction of the record's primary metric (records from before the schema: higher)."""
    return bool(record.get("greater_is_better", True))


def score(record: dict[str, Any]) -> float:
    """The primary metric signed so that higher is always better (a loss is negated); NaN when missing.

    What `mora-train` returns to Hydra sweepers, so an optimiser that maximises is right for every task.
    """
    value = primary_value(record)
    if value is None:
        return math.nan
    return value if greater_is_better(record) else -value


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """The run's numeric metrics: the task's own (everything that is neither identity, training results nor
    bookkeeping), then lm-evaluation-harness's (`lm_eval_metrics`)."""
    skip = set(IDENTITY_KEYS) | set(TRAINING_KEYS) | {RUN_SECTION, LM_EVAL_SECTION}
    own = {k: float(v) for k, v in record.items() if k not in skip and _number(v) is not None}
    return {**own, **lm_eval_metrics(record)}


def scores_of(record: dict[str, Any]) -> dict[str, float]:
    """metrics_of without the task's timings and counts (names ending in _s, _samples, _truncated): what a summary
    line or a model card shows as the run's results."""
    return {k: v for k, v in metrics_of(record).items() if not k.endswith(("_s", "_samples", "_truncated"))}


def lm_eval_metrics(record: dict[str, Any]) -> dict[str, float]:
    """lm-evaluation-harness's numbers as `lm_eval/TASK/METRIC` (its metric names, e.g.
    `lm_eval/gsm8k/exact_match,strict-match`), standard errors left out; {} when the harness did not run."""
    results = (record.get(LM_EVAL_SECTION) or {}).get("results") or {}
    return {
        f"{LM_EVAL_PREFIX}{task}/{metric}": float(value)
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if "_stderr" not in metric and _number(value) is not None
    }


def run_info(record: dict[str, Any], key: str, default: Any = None) -> Any:
    """A bookkeeping value (`run.KEY`)."""
    return (record.get(RUN_SECTION) or {}).get(key, default)


def best(records: list[Any], value: Any, greater: bool) -> Any:
    """The item of `records` whose value(item) is best in the given direction (None values skipped)."""
    scored = [(value(r), r) for r in records if value(r) is not None and not math.isnan(value(r))]
    if not scored:
        return None
    pick = max if greater else min
    return pick(scored, key=lambda pair: pair[0])[1]

"""metrics.json's declared schema: the primary metric's direction drives the summary line, sweeps and reports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mora_train.cli.train import summary_line
from mora_train.core.metrics import make_record, metrics_of, primary_value, run_info, score
from mora_train.tasks import TASKS

TRAINING = {"train_loss": 1.5, "merge_max_abs_diff": 2e-5}


def test_every_task_declares_its_primary_metric_and_direction() -> None:
    losses = {"instruction", "pretrain"}  # eval_loss / eval_perplexity: lower is better
    for name, task in TASKS.items():
        assert task.primary_metric and isinstance(task.greater_is_better, bool)
        assert task.greater_is_better == (name not in losses), name


def test_a_sweep_over_a_loss_task_optimises_the_negated_loss() -> None:
    """Optuna maximises what each job returns (configs/sweep/optuna_lr.yaml): a lower loss must score higher."""
    good = make_record(
        {"task": "instruction"}, "eval_loss", False, {"eval_loss": 1.2, "eval_perplexity": 3.3}, TRAINING
    )
    bad = make_record(
        {"task": "instruction"}, "eval_loss", False, {"eval_loss": 2.5, "eval_perplexity": 12.2}, TRAINING
    )
    assert score(good) == -1.2 and score(good) > score(bad)
    accuracy = make_record({"task": "gsm8k"}, "accuracy", True, {"accuracy": 0.3}, TRAINING)
    assert score(accuracy) == 0.3
    assert math.isnan(score({"primary_metric": "accuracy"}))
    from omegaconf import OmegaConf

    from mora_train.configs import CONFIG_DIR

    assert OmegaConf.load(CONFIG_DIR / "sweep" / "optuna_lr.yaml").hydra.sweeper.direction == "maximize"


def test_bookkeeping_is_kept_apart_from_task_metrics() -> None:
    record = make_record(
        {"task": "uuid", "adapter": "mora", "rank": 8},
        "char_accuracy",
        True,
        {"char_accuracy": 1.0, "exact_match": 1.0},
        TRAINING,
        run={"world_size": 2, "resumed_from_step": 4, "peak_gpu_memory_gib": 3.0, "wall_time_s": 10.0},
    )
    assert metrics_of(record) == {"char_accuracy": 1.0, "exact_match": 1.0}
    assert run_info(record, "world_size") == 2 and primary_value(record) == 1.0
    with pytest.raises(ValueError, match="reserves"):
        make_record({"task": "x"}, "train_loss", True, {"train_loss": 1.0})


def test_gsm8k_summary_prints_its_own_metric_not_exact_match(tmp_path: Path) -> None:
    record = make_record(
        {"task": "gsm8k", "adapter": "lora", "rank": 8},
        "accuracy",
        True,
        {"accuracy": 0.03, "answer_found": 1.0, "eval_runtime_s": 500.0, "eval_s_per_problem": 2.5},
        TRAINING,
        run={"wall_time_s": 900.0},
    )
    line = summary_line(record, tmp_path)
    assert "accuracy: 0.0300 (higher is better)" in line and "answer_found: 1.0000" in line
    assert "exact_match" not in line and "nan" not in line and "eval_runtime_s" not in line
    assert "train_loss: 1.5000" in line and "wall time: 900 s" in line
    loss = make_record(
        {"task": "instruction"}, "eval_loss", False, {"eval_loss": 1.2}, TRAINING, run={"wall_time_s": 1}
    )
    assert "eval_loss: 1.2000 (lower is better)" in summary_line(loss, tmp_path)

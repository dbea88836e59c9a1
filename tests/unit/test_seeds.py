"""Seeds in the report: the Student-t quantile and interval against known values, and a report over hand-made run
folders of two configurations x three seeds (one seed of one failed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mora_train.analysis.report import build_report
from mora_train.analysis.stats import summarize, t_cdf, t_quantile
from mora_train.cli.report import main as report_main

# Two-sided 95 % (p = 0.975) and 99 % (p = 0.995) quantiles as printed in t tables.
T_TABLE = {
    (0.975, 1): 12.706,
    (0.975, 2): 4.303,
    (0.975, 3): 3.182,
    (0.975, 4): 2.776,
    (0.975, 9): 2.262,
    (0.975, 29): 2.045,
    (0.975, 120): 1.980,
    (0.995, 2): 9.925,
    (0.995, 10): 3.169,
}


@pytest.mark.parametrize("p, df", sorted(T_TABLE))
def test_t_quantile_is_the_table_s(p: float, df: int) -> None:
    assert t_quantile(p, df) == pytest.approx(T_TABLE[p, df], abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-T_TABLE[p, df], abs=6e-4)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_quantile_agrees_with_scipy_where_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 40, 1000):
        for p in (0.6, 0.9, 0.975, 0.9995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9), (p, df)


def test_a_summary_of_known_values_has_the_known_mean_sd_and_interval() -> None:
    three = summarize([1.0, 2.0, 3.0])
    assert three is not None and (three.n, three.mean, three.std) == (3, 2.0, 1.0)
    half = 4.302653 / math.sqrt(3)  # t_{0.975, 2} sd / sqrt(n)
    assert (three.ci_low, three.ci_high) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    five = summarize([0.5, 0.7, 0.9, 1.1, 1.3, float("nan"), None])  # not-a-number and missing values are left out
    assert five is not None and five.n == 5 and five.mean == pytest.approx(0.9)
    assert five.std == pytest.approx(math.sqrt(0.1))
    assert five.half_width == pytest.approx(2.776445 * math.sqrt(0.1) / math.sqrt(5), abs=1e-6)
    assert five.text() == "0.9 ± 0.39"
    one = summarize([0.25])
    assert one is not None and (one.n, one.std, one.ci_low, one.half_width) == (1, None, None, None)
    assert one.text() == "0.25" and summarize([]) is None


def make_seed_run(sweep: Path, number: int, adapter: str, lr: float, seed: int, value: float | None) -> None:
    run = sweep / f"{number}_adapter={adapter},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {
        "adapter": {"name": adapter},
        "rank": 8,
        "seed": seed,
        "output_dir": str(run),
        "task": {"name": "uuid"},
        "trainer": {"learning_rate": lr, "resume": "auto"},
    }
    (run / "resolved_config.yaml").write_text(OmegaConf.to_yaml(config))
    (run / ".hydra" / "overrides.yaml").write_text(
        f"- adapter={adapter}\n- trainer.learning_rate={lr}\n- seed={seed}\n"
    )
    if value is None:
        (run / "error.json").write_text(json.dumps({"error_type": "MoraTrainError", "message": "boom"}))
        return
    metrics = {
        "task": "uuid",
        "adapter": adapter,
        "rank": 8,
        "adapter_config": {"variant": "dora"} if adapter == "lora" else {},
        "primary_metric": "char_accuracy",
        "greater_is_better": True,
        "char_accuracy": value,
        "exact_match": value / 2,
        "train_loss": 2.0 + seed,
        "final_logged_loss": 1.0 + seed / 10,
        "trainable_params": 1000,
        "run": {"wall_time_s": 5.0},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_the_report_groups_seeds_and_picks_the_best_configuration_by_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep"
    # MoRA: 0.6, 0.8, 1.0 (mean 0.8, sd 0.2); LoRA (DoRA): 0.7, 0.8 and a failed seed (mean 0.75, sd 0.0707).
    # MoRA at a second learning rate: one seed only, 0.7.
    for number, (adapter, lr, seed, value) in enumerate(
        [
            ("mora", 1e-3, 0, 0.6),
            ("mora", 1e-3, 1, 0.8),
            ("mora", 1e-3, 2, 1.0),
            ("lora", 1e-3, 0, 0.7),
            ("lora", 1e-3, 1, 0.8),
            ("lora", 1e-3, 2, None),
            ("mora", 3e-3, 0, 0.7),
        ]
    ):
        make_seed_run(sweep, number, adapter, lr, seed, value)
    report = build_report(sweep, spectrum=False)
    assert sorted((g.n, g.unfinished) for g in report.groups) == [(1, 0), (2, 1), (3, 0)]
    by_n = {(g.n, g.unfinished): g for g in report.groups}
    mora, dora, single = by_n[3, 0], by_n[2, 1], by_n[1, 0]
    assert mora.seeds == [0, 1, 2] and dora.seeds == [0, 1] and "lora(dora)" in dora.label
    half = 4.302653 * 0.2 / math.sqrt(3)
    assert mora.primary.mean == pytest.approx(0.8) and mora.primary.std == pytest.approx(0.2)
    assert mora.primary.ci_high == pytest.approx(0.8 + half, abs=1e-6)
    assert dora.primary.half_width == pytest.approx(12.706205 * math.sqrt(0.005) / math.sqrt(2), abs=1e-5)
    assert single.primary.std is None
    assert mora.stats["final_train_loss"].mean == pytest.approx(1.1)  # every metric, the training results too

    with open(sweep / "report_seeds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    primary_rows = {r["label"]: r for r in rows if r["metric"] == "char_accuracy"}
    assert float(primary_rows[mora.label]["ci_low"]) == pytest.approx(0.8 - half, abs=1e-5)
    assert primary_rows[mora.label]["seeds"] == "0 1 2" and primary_rows[dora.label]["unfinished_runs"] == "1"
    assert {r["metric"] for r in rows} >= {"char_accuracy", "exact_match", "final_train_loss", "wall_time_s"}

    text = report.markdown_path.read_text()
    assert "## Seeds: mean ± 95 % confidence interval" in text
    assert (
        f"Best configuration by mean char_accuracy over its seeds: {mora.label} with char_accuracy = 0.8 (95 % CI"
        in text
    )
    assert f"[{mora.primary.ci_low:.4g}, {mora.primary.ci_high:.4g}]" in text and "n = 3, seeds 0 1 2" in text
    assert "(+1 unfinished)" in text
    assert (sweep / "seeds.png").stat().st_size > 0 and "seeds" in report.plots
    assert "metric_vs_lr" in report.plots  # the two learning rates, the three seeds as an error bar
    assert report_main([str(sweep), "--no-spectrum"]) == 0
    assert "7 runs (1 failed; 3 configurations, 2 with several seeds)" in capsys.readouterr().out


def test_a_sweep_without_repeated_seeds_keeps_the_one_run_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_seed_run(sweep, 0, "mora", 1e-3, 0, 0.6)
    make_seed_run(sweep, 1, "lora", 1e-3, 0, 0.7)
    report = build_report(sweep, spectrum=False)
    assert all(g.n == 1 for g in report.groups)
    assert not (sweep / "report_seeds.csv").exists() and "seeds" not in report.plots
    assert "## Seeds" not in report.markdown_path.read_text()

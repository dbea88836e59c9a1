"""eval.backend=lm_eval / both: lm-evaluation-harness scores a finished run, a checkpoint and the base model
(tiny random model, a 5-problem GSM8K-style data set written here), offline; its results land in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mora_train.cli.train import summary_line
from mora_train.core.metrics import metrics_of, primary_value
from tests.conftest import compose_config
from tests.conftest import run_evaluation as run_eval
from tests.conftest import run_pipeline as run

pytest.importorskip("lm_eval", reason="lm-eval not installed (optional extra; scripts/setup.sh installs it)")

# Made-up arithmetic in GSM8K's format (worked solution, calculator annotation, "#### N").
PROBLEMS = [(3, 4), (10, 5), (7, 8), (12, 30), (6, 9)]
TINY = [
    "model=tiny-llama",
    "adapter=lora",
    "task=gsm8k",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.micro_batch_size=2",
    "trainer.learning_rate=1e-2",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.lr_scheduler=constant",
    "trainer.save_steps=1",
    "trainer.max_seq_len=128",
    "task.too_long=truncate",
    "task.eval.max_samples=2",
    "task.eval.batch_size=2",
    "task.eval.max_new_tokens=8",
]
HARNESS = ["eval.lm_eval.tasks=[gsm8k]", "eval.lm_eval.max_gen_toks=8", "eval.lm_eval.batch_size=5"]
GSM8K_METRICS = {"exact_match,strict-match", "exact_match,flexible-extract"}


def write_data(data_dir: Path) -> Path:
    (data_dir / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        with open(data_dir / "gsm8k" / f"{split}.jsonl", "w") as f:
            f.writelines(
                json.dumps(
                    {
                        "question": f"A box holds {a} red and {b} blue pens. How many pens are in the box?",
                        "answer": f"There are {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}",
                    }
                )
                + "\n"
                for a, b in PROBLEMS
            )
    return data_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path, Path]:
    """A finished LoRA run on the 5 problems, evaluated by both backends (the task's and the harness's)."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    data_dir = write_data(tmp / "data")
    run_dir = tmp / "run"
    cfg = compose_config(
        [*TINY, f"data_dir={data_dir}", f"task.cache_dir={tmp / 'cache'}", "eval.backend=both", *HARNESS], run_dir
    )
    return run(cfg), run_dir, data_dir


def check_section(section: dict, n: int = 5) -> None:
    import lm_eval

    assert section["version"] == lm_eval.__version__
    assert set(section["results"]) == {"gsm8k"} and set(section["results"]["gsm8k"]) >= GSM8K_METRICS
    assert all(0.0 <= section["results"]["gsm8k"][m] <= 1.0 for m in GSM8K_METRICS)
    assert section["n_samples"] == {"gsm8k": n} and section["higher_is_better"]["gsm8k"]["exact_match"] is True
    assert section["settings"]["tasks"] == ["gsm8k"] and section["settings"]["max_gen_toks"] == 8


def test_training_run_records_both_backends(trained) -> None:
    metrics, run_dir, data_dir = trained
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    # The task's own evaluation still ranks the run; the harness's numbers sit in their own section.
    assert on_disk["primary_metric"] == "accuracy" and on_disk["eval_samples"] == 2
    check_section(on_disk["lm_eval"])
    assert on_disk["lm_eval"]["n_shot"] == {"gsm8k": 5}  # the shipped task's default, like lm-eval's gsm8k
    assert on_disk["lm_eval"]["settings"]["data_dir"] == str(data_dir)
    assert "lm_eval/gsm8k/exact_match,strict-match" in metrics_of(on_disk)
    # What was evaluated: the task file with its data paths made absolute, and one sample line per doc and filter.
    task_file = (run_dir / "lm_eval" / "tasks" / "shipped" / "gsm8k.yaml").read_text()
    assert str(data_dir / "gsm8k" / "test.jsonl") in task_file
    samples = [json.loads(line) for line in (run_dir / "lm_eval" / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and {s["filter"] for s in samples} == {"strict-match", "flexible-extract"}
    assert samples[0]["doc"]["question"].startswith("A box holds 3 red")
    assert json.loads((run_dir / "lm_eval" / "results.json").read_text())["results"]["gsm8k"]


def test_standalone_eval_of_the_finished_run_and_a_checkpoint(trained, tmp_path: Path) -> None:
    _, run_dir, data_dir = trained
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    for name, target in (("run", run_dir), ("checkpoint", checkpoint)):
        out = tmp_path / name
        overrides = [
            *TINY,
            f"data_dir={data_dir}",
            "mode=eval",
            f"checkpoint={target}",
            "eval.backend=lm_eval",
            *HARNESS,
            "eval.lm_eval.num_fewshot=0",
            "eval.lm_eval.limit=3",
        ]
        metrics = run_eval(compose_config(overrides, out))
        # lm_eval alone: no task metrics, the run is ranked by the harness's first metric of the first task.
        assert metrics["primary_metric"] == "lm_eval/gsm8k/exact_match,strict-match" and metrics["greater_is_better"]
        assert (
            "accuracy" not in metrics
            and primary_value(metrics) == metrics["lm_eval"]["results"]["gsm8k"]["exact_match,strict-match"]
        )
        check_section(metrics["lm_eval"], n=3)
        assert metrics["lm_eval"]["n_shot"] == {"gsm8k": 0}
        assert json.loads((out / "metrics.json").read_text())["lm_eval"] == json.loads(json.dumps(metrics["lm_eval"]))
        assert not (out / "predictions.jsonl").exists()  # the task's evaluator did not run
        # The closing lines mora-train prints (cli.train.summary_line): the harness's metrics by their flat names.
        line = summary_line(metrics, out)
        assert "lm_eval/gsm8k/exact_match,strict-match: " in line and "(higher is better)" in line
        assert "lm_eval/gsm8k/exact_match,flexible-extract: " in line
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluated"].endswith("merged")
    assert "merged into model" in json.loads((tmp_path / "checkpoint" / "metrics.json").read_text())["evaluated"]


def test_harness_scores_a_loaded_model_with_its_settings(tmp_path: Path) -> None:
    """lm_harness.evaluate on a model already in memory, with the typed eval.lm_eval section (no pipeline)."""
    import lm_eval
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mora_train.evaluation import lm_harness
    from mora_train.evaluation.config import LmEvalConfig
    from mora_train.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
        )
    )
    data_dir = write_data(tmp_path / "data")
    lm = LmEvalConfig(
        tasks=["gsm8k"], num_fewshot=0, limit=2, batch_size=2, max_gen_toks=4, data_dir=str(data_dir), log_samples=False
    )
    section = lm_harness.evaluate(lm, model, tokenizer, tmp_path / "run")
    assert section["version"] == lm_eval.__version__ and section["settings"] == lm.to_dict()
    assert set(section["results"]["gsm8k"]) >= GSM8K_METRICS and section["n_samples"] == {"gsm8k": 2}
    assert section["n_shot"] == {"gsm8k": 0}
    assert not list((tmp_path / "run" / "lm_eval").glob("samples_*.jsonl"))  # log_samples=false
    assert lm_harness.primary(section, lm.tasks) == ("lm_eval/gsm8k/exact_match,strict-match", True)

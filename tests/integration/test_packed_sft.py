"""Packed instruction tuning from the command line, on the tiny model with a built-in chat template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

RECORDS = [
    {"instruction": f"Repeat the word number {i}.", "input": "", "output": "word " * (1 + i % 7)} for i in range(24)
]


def test_a_packed_instruction_run_trains_and_evaluates(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "model=tiny-llama",
            "adapter=lora",
            "task=instruction",
            f"task.data.train={data}",
            f"task.data.eval={data}",
            "task.data.fields.input=input",
            "task.data.fields.output=output",
            f"task.cache_dir={tmp_path / 'cache'}",
            "task.chat_template=chatml",
            "task.train_on=last_assistant",
            "task.eval.max_samples=4",
            "task.eval.num_generations=1",
            "task.eval.max_new_tokens=4",
            "trainer.packing=true",
            "model.attn_implementation=sdpa",
            "trainer.max_seq_len=256",
            "trainer.max_steps=3",
            "trainer.batch_size=2",
            "trainer.micro_batch_size=2",
            "trainer.learning_rate=1e-2",
            "trainer.warmup_steps=0",
            "trainer.logging_steps=1",
            f"output_dir={run_dir}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["run"]["merge_check"] == "passed"
    losses = [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    log = (run_dir / "train.log").read_text()
    assert "24 examples" in log and "packed into" in log  # 24 short examples: a few rows of 256 tokens
    # The merged model's tokenizer carries the template it was trained with.
    assert "<|im_start|>" in (run_dir / "merged" / "chat_template.jinja").read_text()
    sample = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("<|im_start|>assistant\n")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_one_paragraph(tmp_path: Path) -> None:
    result = run_cli(
        ["model=tiny-llama", "trainer.packing=true", "model.attn_implementation=flash_attention_2"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.attn_implementation=flash_attention_2" in result.stderr and "Traceback" not in result.stderr

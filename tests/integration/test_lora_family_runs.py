"""Each member of the LoRA family through the whole pipeline on the tiny model: it trains, a run stopped part-way
resumes to the uninterrupted run's weights, the merged checkpoint passes the merge check, adapter/ re-attached to a
freshly loaded base computes merged/'s logits, and mora-train-export's folder loads in plain peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mora_train.adapters import load_adapter
from mora_train.cli.train import _run
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.lora_export import export_run
from tests.conftest import compose_config, typed_config
from tests.support.faults import inject

RUN = [
    "model=tiny-llama",
    "rank=4",
    "task.num_pairs=8",
    "task.eval.max_samples=2",
    "trainer.max_steps=6",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.learning_rate=5e-3",
    "trainer.lr_scheduler=constant",
    "trainer.warmup_steps=0",
    "trainer.logging_steps=1",
    "trainer.save_steps=2",
]
MEMBERS = {
    "dora": ["adapter=dora"],
    "pissa": ["adapter=pissa"],
    "olora": ["adapter=olora"],
    "rslora-loraplus": ["adapter=rslora", "adapter.alpha=2r", "trainer.adapter_lr_ratio=4"],
}


def run_in_process(run_dir: Path, *overrides: str) -> int:
    """The CLI's entry function on the composed config; the exit code (0 when it returns)."""
    try:
        _run(compose_config([*RUN, *overrides], run_dir))
    except SystemExit as stop:
        return int(stop.code)
    return 0


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_a_family_member_trains_resumes_merges_and_exports(
    member: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = MEMBERS[member]
    reference = tmp_path / "reference"
    assert run_in_process(reference, *overrides) == 0
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["run"]["merge_check"] == "passed" and metrics["merge_max_abs_diff"] <= metrics["merge_tolerance"]
    losses = [h["loss"] for h in json.loads((reference / "log_history.json").read_text()) if "loss" in h]
    assert losses[-1] < losses[0], losses

    # Stopped by a non-finite loss at step 5 (checkpoint-4 kept), then resumed: the uninterrupted run's weights.
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        inject(patch, "nan@step=5")
        assert run_in_process(stopped, *overrides) == 3
    assert run_in_process(stopped, *overrides) == 0
    assert json.loads((stopped / "metrics.json").read_text())["run"]["resumed_from_step"] == 4
    ours, theirs = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (stopped, reference))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6

    # adapter/ on a freshly loaded (original) base is the merged model.
    cfg = typed_config([*RUN, *overrides])
    attached = load_adapter(load_model_and_tokenizer(cfg.model)[0], reference / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(reference / "merged", dtype=torch.float32)
    torch.testing.assert_close(probe_logits(attached.model), probe_logits(merged), rtol=0, atol=1e-4)

    # The PEFT LoRA export, checked in a process that loads it with plain peft.
    report = export_run(reference, tmp_path / "export")
    assert report["peft_max_abs_logit_diff"] < 1e-4, report


def test_lora_plus_checkpoints_an_optimizer_with_b_at_ratio_times_a(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_in_process(run_dir, "adapter=lora", "trainer.adapter_lr_ratio=8", "trainer.max_steps=2") == 0
    optimizer = torch.load(run_dir / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    rates = sorted({group["lr"] for group in optimizer["param_groups"] if group["params"]})
    assert rates == pytest.approx([5e-3, 4e-2])

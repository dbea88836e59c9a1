"""End-to-end CLI runs on the tiny model: loss falls, outputs land, merged checkpoint stands alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mora_train.adapters import load_adapter
from mora_train.models import load_model_and_tokenizer
from tests.conftest import TINY_RUN, compose_config, run_cli

# Runs in a fresh interpreter that must never import mora_train: the merged folder alone must do.
PLAIN_TRANSFORMERS_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
merged, batch_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
AutoTokenizer.from_pretrained(merged)
batch = load_file(batch_file)
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
save_file({"logits": logits.contiguous()}, out_file)
assert not any(m == "mora_train" or m.startswith("mora_train.") for m in sys.modules), "mora_train was imported"
"""

ADAPTER_ARGS = {
    "lora": ["adapter=lora", "rank=4"],
    "mora-rope": ["adapter=mora", "rank=4", "adapter.mora_type=rope"],
    "mora-sharing": ["adapter=mora", "rank=4", "adapter.mora_type=1"],
    "full": ["adapter=full", "trainer.learning_rate=3e-3"],
}


def logged_losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.parametrize("variant", sorted(ADAPTER_ARGS))
def test_cli_run_trains_exports_and_merged_model_stands_alone(variant: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, *ADAPTER_ARGS[variant], f"output_dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged model:" in result.stdout

    losses = logged_losses(run_dir)
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train_loss", "char_accuracy", "exact_match", "trainable_params", "train_runtime_s", "tokens_per_s", "merge_max_abs_diff"):
        assert key in metrics, key
    assert metrics["merge_max_abs_diff"] <= 1e-4
    assert (run_dir / "loss.png").stat().st_size > 0
    assert (run_dir / "resolved_config.yaml").is_file()
    assert (run_dir / "merged" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").iterdir()), "no TensorBoard events written"

    # The adapted model, rebuilt from the base + saved adapter (the documented reload call)...
    cfg = compose_config([*TINY_RUN, *ADAPTER_ARGS[variant]], run_dir)
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    batch = tokenizer(["Key: 0123\nValue: abc", "hello"], return_tensors="pt", padding=True)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if variant == "full":
        assert not (run_dir / "adapter").exists()
        from transformers import AutoModelForCausalLM

        reference_model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
        assert any(
            not torch.equal(a, b) for a, b in zip(base.state_dict().values(), reference_model.state_dict().values())
        ), "full fine-tuning changed no weight"
    else:
        adapter_files = {p.name for p in (run_dir / "adapter").iterdir()}
        # peft adds a model card (README.md) to LoRA folders; nothing else may be there.
        assert adapter_files - {"README.md"} == {"adapter_config.json", "adapter_model.safetensors"}
        # Adapter weights only: far smaller than the base model.
        saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert sum(t.numel() for t in saved.values()) == metrics["trainable_params"]
        reference_model = load_adapter(base, run_dir / "adapter").model
    reference_model.eval()
    with torch.no_grad():
        reference = reference_model(**batch).logits

    # ...equals what plain transformers computes from merged/ in a process that never imports mora_train.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "batch.safetensors")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS_SCRIPT)
    plain = subprocess.run(
        [sys.executable, str(script), str(run_dir / "merged"), str(tmp_path / "batch.safetensors"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    merged_logits = load_file(tmp_path / "out.safetensors")["logits"]
    mask = batch["attention_mask"].bool()
    assert (merged_logits[mask] - reference[mask]).abs().max().item() <= 1e-4

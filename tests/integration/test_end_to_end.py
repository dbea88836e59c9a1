"""End-to-end runs on the tiny model: loss falls, outputs land, merged checkpoint stands alone."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mora_train.adapters import load_adapter
from mora_train.cli.train import _run
from mora_train.models import load_model_and_tokenizer
from tests.conftest import TINY_RUN, compose_config, run_cli, typed_config

# Runs in a fresh interpreter that must never import mora_train: the merged folders alone must do.
PLAIN_TRANSFORMERS_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
batch_file, out_file, *merged_folders = sys.argv[1:]
batch = load_file(batch_file)
logits = {}
for i, merged in enumerate(merged_folders):
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        logits[str(i)] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.contiguous()
save_file(logits, out_file)
assert not any(m == "mora_train" or m.startswith("mora_train.") for m in sys.modules), "mora_train was imported"
"""

ADAPTER_ARGS = {
    "lora": ["adapter=lora", "rank=4"],
    "mora-rope": ["adapter=mora", "rank=4", "adapter.mora_type=rope"],
    "mora-sharing": ["adapter=mora", "rank=4", "adapter.mora_type=1"],
    "full": ["adapter=full", "trainer.learning_rate=3e-3"],
}
VARIANTS = sorted(ADAPTER_ARGS)
# The default MoRA runs as `python -m mora_train`; the other variants through the same job function in this
# process (what differs between them is the adapter, not the command: the CLI's own behaviour is
# tests/integration/test_cli_contract.py's and test_run_dirs_and_user_configs.py's).
THROUGH_THE_COMMAND = "mora-rope"


@dataclass
class TrainedRun:
    run_dir: Path
    stdout: str
    plain_logits: torch.Tensor  # what plain transformers computes from merged/ for BATCH_TEXTS


BATCH_TEXTS = ["Key: 0123\nValue: abc", "hello"]


def train_variant(variant: str, root: Path) -> tuple[Path, str]:
    run_dir = root / variant / "run"
    args = [*TINY_RUN, *ADAPTER_ARGS[variant]]
    if variant == THROUGH_THE_COMMAND:
        (root / variant).mkdir()
        result = run_cli([*args, f"output_dir={run_dir}"], cwd=root / variant)
        assert result.returncode == 0, result.stderr[-3000:]
        return run_dir, result.stdout
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _run(compose_config(args, run_dir))  # a failure exits (SystemExit) with its message on stderr
    return run_dir, printed.getvalue()


def encode(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(BATCH_TEXTS, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainedRun]:
    """Every variant trained once, and all merged folders read back by one plain-transformers process."""
    root = tmp_path_factory.mktemp("end_to_end")
    trained = {variant: train_variant(variant, root) for variant in VARIANTS}
    _, tokenizer = load_model_and_tokenizer(typed_config(TINY_RUN).model)  # model=tiny-llama's, every variant's
    save_file(encode(tokenizer), root / "batch.safetensors")
    script = root / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS_SCRIPT)
    merged = [str(trained[variant][0] / "merged") for variant in VARIANTS]
    plain = subprocess.run(
        [sys.executable, str(script), str(root / "batch.safetensors"), str(root / "out.safetensors"), *merged],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    logits = load_file(root / "out.safetensors")
    return {v: TrainedRun(*trained[v], plain_logits=logits[str(i)]) for i, v in enumerate(VARIANTS)}


def logged_losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.parametrize("variant", VARIANTS)
def test_run_trains_exports_and_merged_model_stands_alone(variant: str, trained_runs: dict[str, TrainedRun]) -> None:
    run_dir, stdout = trained_runs[variant].run_dir, trained_runs[variant].stdout
    assert "merged model:" in stdout

    losses = logged_losses(run_dir)
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "train_loss",
        "char_accuracy",
        "exact_match",
        "trainable_params",
        "train_runtime_s",
        "tokens_per_s",
        "merge_max_abs_diff",
    ):
        assert key in metrics, key
    assert metrics["merge_max_abs_diff"] <= 1e-4
    assert (run_dir / "loss.png").stat().st_size > 0
    assert (run_dir / "resolved_config.yaml").is_file()
    assert (run_dir / "merged" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").iterdir()), "no TensorBoard events written"

    # The adapted model, rebuilt from the base + saved adapter (the documented reload call)...
    cfg = typed_config([*TINY_RUN, *ADAPTER_ARGS[variant]], run_dir)
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    batch = encode(tokenizer)
    if variant == "full":
        assert not (run_dir / "adapter").exists()
        from transformers import AutoModelForCausalLM

        reference_model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
        assert any(
            not torch.equal(a, b)
            for a, b in zip(base.state_dict().values(), reference_model.state_dict().values(), strict=True)
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

    # ...equals what plain transformers computed from merged/ in a process that never imported mora_train.
    merged_logits = trained_runs[variant].plain_logits
    mask = batch["attention_mask"].bool()
    assert (merged_logits[mask] - reference[mask]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_run_writes_model_cards_that_the_hub_parses(variant: str, trained_runs: dict[str, TrainedRun]) -> None:
    """merged/ and adapter/ each carry a README.md model card: Hub metadata (huggingface_hub's own parser), the
    run's final metrics, its merge check, and how to load the folder; checksums.json covers them."""
    from huggingface_hub import ModelCard

    run_dir = trained_runs[variant].run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    merged = ModelCard.load(run_dir / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and merged.data.pipeline_tag == "text-generation"
    assert merged.data.tags[:2] == ["mora-train", metrics["adapter"]]
    assert merged.data.base_model is None  # model=tiny-llama is random: described in the body, never named
    scores = {r.metric_type: r.metric_value for r in merged.data.eval_results}
    assert scores == {"char_accuracy": metrics["char_accuracy"], "exact_match": metrics["exact_match"]}
    assert f"max |logit difference| {metrics['merge_max_abs_diff']:.3g}" in merged.text
    assert f"tolerance {metrics['merge_tolerance']:.3g}" in merged.text
    assert f"{metrics['trainable_params']:,} of {metrics['total_params']:,}" in merged.text
    checksummed = json.loads((run_dir / "checksums.json").read_text())
    assert "merged/README.md" in checksummed
    if variant == "full":
        return
    adapter = ModelCard.load(run_dir / "adapter" / "README.md")
    assert adapter.data.library_name == ("peft" if variant == "lora" else "mora-train")  # peft wrote LoRA's folder
    assert ("PeftModel.from_pretrained" in adapter.text) == (variant == "lora")
    assert "adapter/README.md" in checksummed
    size = "r=4" if variant == "lora" else "r̂="
    assert f"| {size}" in adapter.text  # the per-layer-shape table: LoRA's r, MoRA's r̂
    recorded = json.loads((run_dir / "card_facts.json").read_text())
    assert recorded["method"] == metrics["adapter"] and recorded["merge"]["passed"] is True

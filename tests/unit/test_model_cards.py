"""Model cards (mora_train.export.card): every kind of folder gets a README.md that huggingface_hub's own parser reads
back with the metadata the Hub indexes, and whose body says what the model is, what checked it and how to load it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mora_train.core.errors import MoraTrainError
from mora_train.export.card import (
    FOLDER_PLACEHOLDER,
    CardFacts,
    GgufExport,
    LayerShape,
    LoraExport,
    MergeCheck,
    Training,
    card_for_repo,
    model_card_text,
    read_card_facts,
    write_card_facts,
    write_model_card,
)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def facts(**changes) -> CardFacts:
    made = CardFacts(
        name="SmolLM2-135M-Instruct-mora-gsm8k",
        method="mora",
        title="mora (rank 8, type rope)",
        base_model=BASE,
        base_model_note="The base weights were de-quantized from the GGUF file X.Q4_1.gguf (Q4_1 quantization).",
        settings={"format": "mora-train", "rank": 8, "mora_type": "rope", "target_modules": ["q_proj", "v_proj"]},
        layers=[LayerShape("q_proj", 576, 576, "r̂=96", 30, 9216), LayerShape("k_proj", 192, 576, "r̂=55", 30, 3025)],
        trainable_params=1_234_567,
        total_params=135_000_000,
        training=Training(task="gsm8k", steps=200, learning_rate=2e-4, batch_size=8, max_seq_len=384, seed=42),
        datasets=["openai/gsm8k"],
        eval_dataset="openai/gsm8k",
        metrics={"accuracy": 0.3125, "answer_found": 0.97},
        primary_metric="accuracy",
        merge=MergeCheck(max_abs_diff=3.72e-05, tolerance=1.61e-03, passed=True, dtype="float32"),
        lora=LoraExport(rank=96, truncated=False, max_relative_error=2e-7, mean_relative_error=1e-7),
        gguf=GgufExport(file="model-f16.gguf", outtype="f16", modelfile="Modelfile", max_abs_logit_diff=0.01),
    )
    return dataclasses.replace(made, **changes)


def written(tmp_path: Path, kind: str, card_facts: CardFacts | None = None) -> ModelCard:
    path = write_model_card(tmp_path, card_facts or facts(), kind)
    assert path == tmp_path / "README.md"
    return ModelCard.load(path)


@pytest.mark.parametrize(
    "kind,library,relation,extra_tags",
    [
        ("merged", "transformers", "finetune", []),
        ("adapter", "mora-train", "adapter", []),
        ("lora", "peft", "adapter", ["lora", "peft"]),
        ("gguf", "transformers", "finetune", ["gguf", "llama.cpp", "ollama"]),
    ],
)
def test_the_hub_parses_the_metadata_of_every_kind(
    kind: str, library: str, relation: str, extra_tags: list[str], tmp_path: Path
) -> None:
    card = written(tmp_path, kind)
    data = card.data
    assert data.base_model == BASE and data.library_name == library and data.pipeline_tag == "text-generation"
    assert data.to_dict()["base_model_relation"] == relation
    assert data.tags == ["mora-train", "mora", *extra_tags]
    assert data.datasets == ["openai/gsm8k"]
    # The final metrics as a model-index, read back by huggingface_hub into EvalResults.
    assert data.model_name == "SmolLM2-135M-Instruct-mora-gsm8k"
    assert {(r.metric_type, r.metric_value, r.dataset_type) for r in data.eval_results} == {
        ("accuracy", 0.3125, "openai/gsm8k"),
        ("answer_found", 0.97, "openai/gsm8k"),
    }
    body = card.text
    assert "mora (rank 8, type rope)" in body and "1,234,567 of 135,000,000" in body
    assert "| `q_proj` | 576 \N{MULTIPLICATION SIGN} 576 | r̂=96 | 30 | 9,216 |" in body  # r̂ per layer shape
    assert "Q4_1" in body  # how the weights differ from the base's
    assert "task `gsm8k`, 200 steps, learning rate 0.0002" in body
    assert "**Merge check: passed.**" in body and "3.72e-05" in body and "0.00161" in body
    assert "arXiv:2405.12130" in body and "@article{jiang2024mora" in body


def test_each_kind_says_how_to_load_it(tmp_path: Path) -> None:
    merged = model_card_text(facts(), "merged")
    assert f'AutoModelForCausalLM.from_pretrained("{FOLDER_PLACEHOLDER}")' in merged
    adapter = model_card_text(facts(), "adapter")
    assert "load_adapter(AutoModelForCausalLM.from_pretrained" in adapter and "PeftModel" not in adapter
    peft_adapter = model_card_text(facts(adapter_library="peft"), "adapter")
    assert f'PeftModel.from_pretrained(base, "{FOLDER_PLACEHOLDER}")' in peft_adapter
    lora = model_card_text(facts(), "lora")
    assert f"vllm serve {BASE} --enable-lora --max-lora-rank 128 --lora-modules mora={FOLDER_PLACEHOLDER}" in lora
    assert f"--model-path {BASE} --lora-paths mora={FOLDER_PLACEHOLDER}" in lora
    gguf = model_card_text(facts(), "gguf")
    assert "llama-cli -m model-f16.gguf" in gguf and "ollama create mora-model -f Modelfile" in gguf
    assert 'gguf_file="model-f16.gguf"' in gguf and "tensor type f16" in gguf


def test_lora_exports_say_whether_they_are_exact(tmp_path: Path) -> None:
    exact = model_card_text(facts(), "lora")
    assert "**Exact export.**" in exact and "Truncated" not in exact
    cut = LoraExport(rank=32, truncated=True, max_relative_error=0.21, mean_relative_error=0.12, per_layer_ranks=True)
    truncated = model_card_text(facts(lora=cut), "lora")
    assert "**Truncated export.**" in truncated and "Exact export" not in truncated
    assert "max 0.21, mean 0.12" in truncated and "it is not the trained model" in truncated
    assert "`rank_pattern`" in truncated and "--max-lora-rank 32" in truncated
    too_wide = model_card_text(facts(lora=dataclasses.replace(cut, rank=576)), "lora")
    assert not re.search(r"--max-lora-rank \d", too_wide) and "above vLLM's largest `--max-lora-rank` (512)" in too_wide


def test_a_failed_merge_check_is_said(tmp_path: Path) -> None:
    failed = MergeCheck(max_abs_diff=0.5, tolerance=1e-4, passed=False)
    text = written(tmp_path, "adapter", facts(merge=failed)).text
    assert "**Merge check: FAILED.**" in text and "the adapter is intact" in text


def test_a_base_without_a_hub_id_is_described_not_named(tmp_path: Path) -> None:
    no_hub = facts(base_model=None, base_model_note=None, base_description="a randomly initialised llama model")
    card = written(tmp_path, "adapter", no_hub)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert 'from_pretrained("BASE_MODEL")' in card.text and "a randomly initialised llama model" in card.text


def test_a_run_without_metrics_has_no_model_index(tmp_path: Path) -> None:
    card = written(tmp_path, "merged", facts(metrics={}, datasets=[], eval_dataset=None))
    assert card.data.eval_results is None and card.data.datasets is None
    assert "## Results" not in card.text


def test_the_card_replaces_peft_s_template(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    assert written(tmp_path, "adapter").data.library_name == "mora-train"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # nothing left behind


def test_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MoraTrainError, match=r"kind 'onnx' is unknown; use one of merged, adapter, lora, gguf$"):
        write_model_card(tmp_path, facts(), "onnx")
    assert not (tmp_path / "README.md").exists()


def test_pushing_names_the_repo_in_the_commands() -> None:
    text = card_for_repo(model_card_text(facts(), "lora"), "me/smollm2-mora")
    assert FOLDER_PLACEHOLDER not in text and "--lora-modules mora=me/smollm2-mora" in text
    assert ModelCard(text).data.base_model == BASE


def test_the_facts_round_trip_through_the_run_dir(tmp_path: Path) -> None:
    assert read_card_facts(tmp_path) is None  # a run from before cards
    write_card_facts(tmp_path, facts())
    assert read_card_facts(tmp_path) == facts()
    (tmp_path / "card_facts.json").write_text("{not json")
    with pytest.raises(MoraTrainError, match=r"card_facts\.json is unreadable"):
        read_card_facts(tmp_path)

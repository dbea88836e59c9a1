"""The Hub id a base model's weights correspond to (model.hub_id): what model cards and LoRA exports record."""

from __future__ import annotations

import pytest

from mora_train.models.config import ModelConfig
from mora_train.models.hub import base_model_id, base_weights_note
from tests.conftest import typed_config

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_default_model_names_its_hub_model_and_says_its_weights_are_a_dequantized_gguf() -> None:
    model = typed_config([]).model
    assert model.hub_id == SMOLLM2 and base_model_id(model) == SMOLLM2
    note = base_weights_note(model)
    assert note is not None and "SmolLM2-135M-Instruct.Q4_1.gguf" in note and "Q4_1 quantization" in note


def test_pointing_the_default_model_elsewhere_drops_its_hub_id() -> None:
    """The shipped file's Hub id never follows the run onto another model (model.name_or_path=...)."""
    model = typed_config(["model.name_or_path=Qwen/Qwen2.5-0.5B", "model.package=null"]).model
    assert model.hub_id is None and base_model_id(model) == "Qwen/Qwen2.5-0.5B"
    assert base_weights_note(model) is None


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model=qwen2.5-0.5b"], "Qwen/Qwen2.5-0.5B"),  # a Hub id is its own
        (["model=tiny-llama"], None),  # a random model has none
        (["model=qwen2.5-0.5b", "model.hub_id=Qwen/Qwen2.5-0.5B-Instruct"], "Qwen/Qwen2.5-0.5B-Instruct"),
    ],
)
def test_base_model_id(overrides: list[str], expected: str | None) -> None:
    assert base_model_id(typed_config(overrides).model) == expected


def test_a_local_folder_has_no_hub_id_unless_named(tmp_path) -> None:
    folder = str(tmp_path)
    assert base_model_id(ModelConfig(name_or_path=folder)) is None
    named = ModelConfig(name_or_path=folder, hub_id="meta-llama/Llama-2-7b-hf", hub_id_note="Converted from fp16.")
    assert base_model_id(named) == "meta-llama/Llama-2-7b-hf" and base_weights_note(named) == "Converted from fp16."


def test_a_quantized_base_is_noted() -> None:
    note = base_weights_note(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B", quantization="nf4"))
    assert note is not None and "nf4" in note and "de-quantized" in note


@pytest.mark.parametrize("bad", ["./weights", "/abs/model", "model.gguf", "two//slashes", "a/b/c"])
def test_a_hub_id_that_is_not_one_is_refused_naming_the_key(bad: str) -> None:
    problems = ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B", hub_id=bad).check("model")
    assert any(p.startswith(f"`model.hub_id={bad}` is not a Hugging Face Hub model id") for p in problems), problems

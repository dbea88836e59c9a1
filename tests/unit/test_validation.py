"""validate() reports every problem at once, each naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mora_train.core.errors import ConfigError
from tests.conftest import compose_config
from tests.conftest import validate_config as validate


def problems_of(overrides: list[str], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["model=tiny-llama", *overrides], tmp_path))
    return info.value.problems


def test_all_problems_reported_together(tmp_path: Path) -> None:
    problems = problems_of(["rank=0", "trainer.micro_batch_size=3", "trainer.learning_rate=-1"], tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 3
    assert "rank=0" in text and "micro_batch_size=3" in text and "learning_rate=-1" in text


def test_micro_batch_larger_than_batch(tmp_path: Path) -> None:
    (problem,) = problems_of(["trainer.batch_size=4", "trainer.micro_batch_size=8"], tmp_path)
    assert "micro_batch_size=8" in problem and "divisor of 4" in problem


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    (problem,) = problems_of(["trainer.max_steps=ten"], tmp_path)
    assert "trainer.max_steps" in problem and "int" in problem


def test_unknown_mora_type_lists_valid_ones(tmp_path: Path) -> None:
    (problem,) = problems_of(["adapter.mora_type=spiral"], tmp_path)
    assert "spiral" in problem and "sharing" in problem and "rope" in problem


def test_missing_local_model_path(tmp_path: Path) -> None:
    problems = problems_of(
        ["model=smollm2-135m", "model.package=null", f"model.name_or_path={tmp_path}/nope"], tmp_path
    )
    assert any("does not exist" in p and "nope" in p for p in problems)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of fp16")
def test_fp16_refused_without_gpu(tmp_path: Path) -> None:
    (problem,) = problems_of(["trainer.precision=fp16"], tmp_path)
    assert "fp16" in problem and "bf16" in problem


def test_task_without_eval_data_is_refused(tmp_path: Path) -> None:
    problems = problems_of(["task=gsm8k", "task.data.eval=null"], tmp_path)
    assert any("task.data.eval" in p and "not set" in p for p in problems)


def test_random_init_and_name_or_path_together_are_refused(tmp_path: Path) -> None:
    (problem,) = problems_of([f"model.name_or_path={tmp_path}"], tmp_path)  # tiny-llama keeps its random_init
    assert f"model.name_or_path={tmp_path}" in problem and "model.random_init" in problem
    assert "model.random_init=null" in problem  # the fix for loading the folder


def test_loading_refuses_the_same_conflict_past_validation(tmp_path: Path) -> None:
    import dataclasses

    from mora_train.core.errors import MoraTrainError
    from mora_train.models import load_model_and_tokenizer
    from tests.conftest import typed_config

    model_cfg = dataclasses.replace(typed_config(["model=tiny-llama"]).model, name_or_path=str(tmp_path))
    with pytest.raises(MoraTrainError, match="random_init"):
        load_model_and_tokenizer(model_cfg)


def test_a_huge_value_is_shortened_in_the_message(tmp_path: Path) -> None:
    huge = "x" * 100_000
    problems = problems_of([f"trainer.lr_scheduler={huge}"], tmp_path)
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["model=tiny-llama", f"trainer.lr_scheduler={huge}"], tmp_path))
    message = str(info.value)
    assert any(huge in p for p in problems)  # the problem list keeps the value; what is shown is shortened
    assert len(message) < 3_000 and "(100,000 characters)" in message and "trainer.lr_scheduler" in message


def test_a_top_level_key_nothing_reads_is_refused(tmp_path: Path) -> None:
    (problem,) = problems_of(["+learning_rate=1e-3"], tmp_path)  # Hydra accepts it with +; it would be ignored
    assert "`learning_rate` is not a key mora-train reads" in problem and "trainer" in problem


def test_the_run_config_reads_exactly_the_keys_of_the_composed_config(tmp_path: Path) -> None:
    import dataclasses

    from mora_train.pipeline.run_config import RunConfig

    fields = {field.name for field in dataclasses.fields(RunConfig)}
    assert fields == set(compose_config(["model=tiny-llama"], tmp_path).keys())


def test_a_top_level_key_points_to_the_section_that_has_it(tmp_path: Path) -> None:
    (problem,) = problems_of(["+learning_rate=1e-3"], tmp_path)
    assert "did you mean trainer.learning_rate?" in problem

"""Packed SFT (trainer.packing): rows of whole examples, and per-token losses equal to the unpacked ones."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from mora_train.core.errors import ConfigError
from mora_train.data.common import IGNORE_INDEX, PadCollator
from mora_train.data.packing import best_fit_rows, pack_examples, training_rows
from mora_train.models import load_model_and_tokenizer
from mora_train.models.attention import flattens_packed_rows, keeps_packed_examples_apart, packing_problem
from tests.conftest import compose_run, typed_config


def synthetic_examples(count: int, seed: int, vocab: int = 250, longest: int = 20) -> list[dict[str, list[int]]]:
    """Examples of 3..longest tokens: a prompt (labels ignored), then a response (labelled)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.randint(3, longest)
        prompt = rng.randint(1, length - 1)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def test_best_fit_rows_place_every_example_once_within_the_row_size() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = best_fit_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # Best-fit decreasing stays close to the lower bound on the number of rows.
    assert len(rows) <= sum(lengths) / 64 * 1.05 + 1
    assert best_fit_rows(lengths, 64) == rows  # deterministic


def test_packed_rows_restart_positions_and_learn_nothing_across_examples() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},  # a first token with a label: never a target once packed
        {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
    ]
    rows, report = pack_examples(examples, 8)
    assert (report.examples, report.rows, report.tokens) == (3, 2, 9)
    assert rows[0] == {
        "input_ids": [10, 11, 12, 13, 5, 6, 7],
        "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX, 6, 7],
        "position_ids": [0, 1, 2, 3, 0, 1, 2],
    }
    assert rows[1] == {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9], "position_ids": [0, 1]}
    assert training_rows(examples, 8, packing=False) == examples
    assert training_rows(rows, 8, packing=True) == rows  # already packed (pretraining blocks): kept as they are


def tiny_model(attn_implementation: str, dtype: torch.dtype):
    run = typed_config(["model=tiny-llama", f"model.attn_implementation={attn_implementation}"])
    model, _ = load_model_and_tokenizer(run.model)
    assert model.config._attn_implementation == attn_implementation
    return model.to(dtype).eval()


def token_losses(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of every position's next token (nan where the label is ignored)."""
    with torch.no_grad():
        logits = model(**batch).logits.double()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    return losses.masked_fill(targets == IGNORE_INDEX, float("nan"))


def packed_losses_by_example(
    model, examples: list[dict], max_seq_len: int, flatten: bool, prepare: Callable[[dict], dict] = lambda b: b
) -> list[torch.Tensor]:
    """Each example's per-token losses, read from the packed rows (batches of 4 rows) at its offset; `prepare`
    moves a batch where the model is."""
    rows, _ = pack_examples(examples, max_seq_len)
    members = best_fit_rows([len(e["input_ids"]) for e in examples], max_seq_len)
    collate = PadCollator(pad_token_id=0, flatten=flatten)
    found: dict[int, torch.Tensor] = {}
    for start in range(0, len(rows), 4):
        losses = token_losses(model, prepare(collate(rows[start : start + 4]))).cpu()
        flat = losses.reshape(-1) if flatten else None
        offset = 0
        for r, row_members in enumerate(members[start : start + 4]):
            row_losses = flat if flatten else losses[r]
            at = offset if flatten else 0
            for index in row_members:
                length = len(examples[index]["input_ids"])
                found[index] = row_losses[at : at + length - 1]  # the targets of tokens 1..length-1
                at += length
            offset = at if flatten else 0
    return [found[i] for i in range(len(examples))]


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
# float64 is not exact: Llama's RMSNorm computes in float32 whatever the model's dtype (observed: 1.3e-8).
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-7), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_per_token_losses_equal_the_unpacked_ones(
    implementation: str, dtype: torch.dtype, tolerance: float, flatten: bool
) -> None:
    model = tiny_model(implementation, dtype)
    examples = synthetic_examples(12, seed=1)
    alone = [token_losses(model, PadCollator(0)([e]))[0] for e in examples]  # each example on its own
    padded = token_losses(model, PadCollator(0)(examples))  # the unpacked batch, right-padded
    packed = packed_losses_by_example(model, examples, max_seq_len=32, flatten=flatten)
    for i, example in enumerate(examples):
        n = len(example["input_ids"]) - 1
        learned = ~torch.isnan(alone[i])
        assert learned.any()
        assert torch.equal(learned, ~torch.isnan(packed[i]))  # the same tokens are learned
        assert float((packed[i][learned] - alone[i][learned]).abs().max()) <= tolerance
        assert float((padded[i, :n][learned] - alone[i][learned]).abs().max()) <= tolerance


def test_losses_differ_when_packed_examples_see_each_other() -> None:
    """The comparison above can fail: with an attention mask over the whole row, examples leak into each other."""
    model = tiny_model("sdpa", torch.float64)
    examples = synthetic_examples(6, seed=2)
    rows, _ = pack_examples(examples, 32)
    batch = PadCollator(0)(rows[:1])
    separate = token_losses(model, batch)
    leaky = token_losses(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
    both = ~torch.isnan(separate)
    assert float((separate[both] - leaky[both]).abs().max()) > 1e-3


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_packing_check_passes_models_that_keep_examples_apart(implementation: str) -> None:
    model = tiny_model(implementation, torch.float32)
    assert keeps_packed_examples_apart(model)
    assert packing_problem(model) is None
    assert not flattens_packed_rows(model)


def test_the_packing_check_refuses_attention_that_ignores_packed_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.masking_utils as masking

    model = tiny_model("sdpa", torch.float32)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # a model that ignores them
    problem = packing_problem(model)
    assert problem is not None and "trainer.packing=true" in problem and "attend to each other" in problem
    assert "trainer.packing=false" in problem
    monkeypatch.undo()
    model.config._attn_implementation = "flex_attention"
    problem = packing_problem(model)
    assert problem is not None and "'flex_attention'" in problem and "model.attn_implementation=sdpa" in problem
    model.config._attn_implementation = "flash_attention_2"  # separated by the varlen kernel: rows flattened
    assert packing_problem(model) is None and flattens_packed_rows(model)


def test_flash_attention_is_checked_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as info:
        compose_run(["model=tiny-llama", "model.attn_implementation=flash_attention_2"])
    assert any("flash-attn" in p and "model.attn_implementation=flash_attention_2" in p for p in info.value.problems)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from mora_train.models.config import ModelConfig, attn_implementation_problems

    problems = attn_implementation_problems(ModelConfig(attn_implementation="flash_attention_2"), "model")
    assert problems and "needs a CUDA GPU" in problems[0]


def test_flash_attention_rows_are_flattened_into_one() -> None:
    rows, _ = pack_examples(synthetic_examples(5, seed=3), 24)
    batch = PadCollator(pad_token_id=0, flatten=True)(rows)
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # no padding at all
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in r["position_ids"]]


def test_a_packed_uuid_run_trains(tiny_config, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from tests.conftest import run_pipeline

    with caplog.at_level(logging.INFO, logger="mora_train.data.packing"):
        metrics = run_pipeline(tiny_config("trainer.packing=true", "trainer.max_seq_len=256", "trainer.max_steps=3"))
    assert metrics["train_steps"] == 3 and metrics["run"]["merge_check"] == "passed"
    packed = [r.getMessage() for r in caplog.records if "packed into" in r.getMessage()]
    # 8 UUID pairs of 86 byte-level tokens each: two to a row of 256.
    assert packed and packed[0].startswith("trainer.packing: 8 examples (688 tokens) packed into 4 rows")


def test_the_preflight_refuses_packing_that_cannot_keep_examples_apart(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's own check (before the adapter is built and anything is written): packing + the model's attention."""
    import transformers.masking_utils as masking

    from mora_train.training.preflight import PlannedRun, model_fit_problems

    def problems(*overrides: str) -> list[str]:
        run = compose_run(["model=tiny-llama", "adapter=lora", *overrides], tmp_path / "run")
        model, _ = load_model_and_tokenizer(run.model)
        planned = PlannedRun(run.model, run.trainer, run.adapter, run.rank, tmp_path / "run", None)
        return model_fit_problems(model, planned)

    assert problems("trainer.packing=true", "model.attn_implementation=eager") == []
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert problems("trainer.packing=false") == []  # unpacked: nothing to keep apart
    (problem,) = problems("trainer.packing=true")
    assert "`trainer.packing=true`" in problem and "model.attn_implementation=sdpa" in problem


class _Stream:
    """An iterable with no length, as a streamed dataset (task.data.streaming) is; reading it ahead would never end."""

    def __iter__(self):
        raise AssertionError("training_rows read the stream")


@pytest.mark.parametrize("packing", [False, True])
def test_a_stream_reaches_the_trainer_unread(packing: bool) -> None:
    stream = _Stream()
    assert training_rows(stream, 16, packing) is stream  # type: ignore[arg-type]

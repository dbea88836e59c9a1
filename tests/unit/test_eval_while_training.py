"""Evaluation while training, without training: the config problems of its keys, the validation split, the
validation sets the tasks give, the sample prompts, and the early-stopping state a checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mora_train.core.errors import ConfigError, MoraTrainError
from mora_train.data.common import IGNORE_INDEX
from mora_train.models import byte_tokenizer
from mora_train.tasks import TASKS
from mora_train.tasks.validation import build_validation, carve
from mora_train.training.config import TrainerConfig
from mora_train.training.eval_callbacks import (
    EarlyStopping,
    best_evaluation,
    saved_patience_counter,
    stopped_early,
)
from mora_train.training.samples import TEXT_PROMPT_TOKENS, as_markdown, sample_prompt, sample_prompts
from tests.conftest import compose_config
from tests.conftest import validate_config as validate

EVAL = ["trainer.eval_steps=2", "trainer.save_steps=2"]
LONG = "trainer.max_seq_len=4096"  # the byte tokenizer: one token per byte


def problems_of(tmp_path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["model=tiny-llama", *overrides], tmp_path))
    return info.value.problems


def only(problems: list[str], *needles: str) -> str:
    """The one problem holding every needle (each bad input gets one message)."""
    found = [p for p in problems if all(n in p for n in needles)]
    assert len(found) == 1, problems
    return found[0]


# -- config problems -------------------------------------------------------------------------------------------


def test_good_configs_validate(tmp_path: Path) -> None:
    run = validate(
        compose_config(["model=tiny-llama", *EVAL, "task.val_size=0.25", "trainer.load_best=true"], tmp_path)
    )
    assert run.trainer.evaluates and run.task.val_size == 0.25
    run = validate(compose_config(["model=tiny-llama", "task=instruction", *EVAL, "trainer.sample_every=4"], tmp_path))
    assert run.task.val_size is None  # the held-out set, task.data.eval
    assert validate(compose_config(["model=tiny-llama", "task.val_size=4", "trainer.sample_every=3"], tmp_path))


def test_eval_steps_without_any_validation_set_names_val_size(tmp_path: Path) -> None:
    problem = only(problems_of(tmp_path, *EVAL), "trainer.eval_steps=2")
    assert "task=uuid has no held-out set" in problem and "task.val_size=0.1" in problem
    problem = only(problems_of(tmp_path, "trainer.sample_every=5"), "trainer.sample_every=5")
    assert "task.val_size" in problem


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["trainer.load_best=true"], ["trainer.load_best=true", "trainer.eval_steps=0", "set trainer.eval_steps=N"]),
        (["trainer.early_stopping_patience=3"], ["trainer.early_stopping_patience=3", "set trainer.eval_steps=N"]),
        (["trainer.eval_steps=4", "trainer.save_steps=6", "trainer.load_best=true", "task.val_size=2"],
         ["trainer.save_steps=6", "not a multiple of `trainer.eval_steps=4`", "trainer.save_steps=4"]),
        (["trainer.eval_steps=4", "trainer.save_steps=0", "trainer.load_best=true", "task.val_size=2"],
         ["trainer.save_steps=0", "trainer.load_best=true"]),
        ([*EVAL, "trainer.save_total_limit=1", "trainer.load_best=true", "task.val_size=2"],
         ["trainer.save_total_limit=1", "trainer.save_total_limit=2"]),
        (["task.val_size=1.5", *EVAL], ["task.val_size=1.5", "between 0 and 1"]),
        (["task.val_size=1.0", *EVAL], ["task.val_size=1.0", "between 0 and 1"]),
        (["task.val_size=0", *EVAL], ["task.val_size=0", "a count of at least 1"]),
        (["task.val_size=0.1"], ["task.val_size=0.1", "nothing reads it", "trainer.eval_steps=N"]),
        (["trainer.eval_steps=-1"], ["trainer.eval_steps=-1", "at least 0"]),
        (["trainer.early_stopping_threshold=-0.5"], ["trainer.early_stopping_threshold=-0.5"]),
        (["trainer.num_samples=0"], ["trainer.num_samples=0", "at least 1"]),
        ([*EVAL, "task.val_size=2", "trainer.load_best=true", "distributed=zero2"],
         ["trainer.load_best", "distributed=deepspeed", "distributed=none or ddp"]),
        ([*EVAL, "task.val_size=2", "+trainer.hf.load_best_model_at_end=true"],
         ["trainer.hf.load_best_model_at_end", "`trainer.load_best`"]),
    ],
)  # fmt: skip
def test_bad_inputs_get_one_message_naming_the_key_and_the_fix(
    overrides: list[str], needles: list[str], tmp_path: Path
) -> None:
    only(problems_of(tmp_path, *overrides), *needles)


def test_a_metric_driven_scheduler_runs_once_training_evaluates(tmp_path: Path) -> None:
    only(problems_of(tmp_path, "trainer.lr_scheduler=reduce_lr_on_plateau"), "trainer.eval_steps=N")
    validate(
        compose_config(["model=tiny-llama", *EVAL, "task.val_size=2", "trainer.lr_scheduler=reduce_lr_on_plateau"])
    )


# -- the validation split --------------------------------------------------------------------------------------


def test_val_size_carves_the_same_examples_for_the_same_seed() -> None:
    train = [{"input_ids": [i], "labels": [i]} for i in range(40)]
    first, again, other = carve(train, 0.25, seed=7), carve(train, 0.25, seed=7), carve(train, 0.25, seed=8)
    assert len(first.examples) == 10 and len(first.train) == 30
    assert first.examples == again.examples and first.train == again.train  # stable across a resume
    assert first.examples != other.examples
    ids = [e["input_ids"][0] for e in first.examples]
    assert ids == sorted(ids) and ids != list(range(10))  # drawn at random, file order kept
    assert sorted(ids + [e["input_ids"][0] for e in first.train]) == list(range(40))  # a partition
    assert len(carve(train, 3, seed=0).examples) == 3 and len(carve(train, 0.001, seed=0).examples) == 1
    assert "10 of 40 training examples" in first.source


def test_val_size_taking_everything_or_a_streamed_set_is_refused() -> None:
    train = [{"input_ids": [i], "labels": [i]} for i in range(4)]
    with pytest.raises(MoraTrainError, match=r"task.val_size=4.*takes 4 of the 4 training examples"):
        carve(train, 4, seed=0)
    with pytest.raises(MoraTrainError, match=r"task.val_size=0.9.*leaving none"):
        carve(train[:1], 0.9, seed=0)
    with pytest.raises(MoraTrainError, match=r"streamed.*task.data.eval"):
        carve(iter(train), 2, seed=0)


def test_val_size_selects_from_a_datasets_dataset() -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{"input_ids": [i], "labels": [i]} for i in range(10)])
    split = carve(train, 0.3, seed=1)
    assert len(split.examples) == 3 and len(split.train) == 7 and isinstance(split.train, datasets.Dataset)
    assert [e["input_ids"][0] for e in split.examples] == [
        e["input_ids"][0] for e in carve(list(train), 0.3, 1).examples
    ]


def _settings(tmp_path: Path, task: str, *overrides: str):
    cfg = compose_config(["model=tiny-llama", f"task={task}", f"task.cache_dir={tmp_path / 'cache'}", *overrides])
    from mora_train.pipeline.run_config import read_run_config

    run, problems = read_run_config(cfg)
    assert problems == []
    return run


def test_math_validation_is_the_held_out_problems_with_their_solutions(tmp_path: Path) -> None:
    run = _settings(tmp_path, "gsm8k", "task.eval.max_samples=3", "task.data.train.limit=20", LONG, *EVAL)
    tokenizer, task = byte_tokenizer(), TASKS["gsm8k"]
    built = task.build(run.task, tokenizer, run.trainer.max_seq_len)
    validation = build_validation(task, run.task, run.trainer, tokenizer, built, seed=0)
    assert validation is not None and validation.train is built.train and len(validation.examples) == 3
    for example, problem in zip(validation.examples, built.problems, strict=True):
        learned = tokenizer.decode(
            [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]
        )
        assert problem.reference.split("####")[-1].strip() in learned  # the loss is on the reference solution
        assert "<<" not in learned  # written as training writes its targets
        assert tokenizer.decode(example["input_ids"]).startswith(f"Question: {problem.question}")


def test_instruction_and_pretraining_validation_are_their_held_out_examples(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    run = _settings(tmp_path, "instruction", "task.eval.max_samples=4", "task.data.train.limit=8", LONG, *EVAL)
    built = TASKS["instruction"].build(run.task, tokenizer, run.trainer.max_seq_len)
    validation = build_validation(TASKS["instruction"], run.task, run.trainer, tokenizer, built, seed=0)
    assert validation is not None and validation.examples == built.eval_examples and len(validation.examples) == 4
    assert validation.source == "task.data.eval (4 examples)"
    run = _settings(tmp_path, "instruction", "task.data.train.limit=8", "task.val_size=2", LONG, *EVAL)
    built = TASKS["instruction"].build(run.task, tokenizer, run.trainer.max_seq_len)
    validation = build_validation(TASKS["instruction"], run.task, run.trainer, tokenizer, built, seed=0)
    assert validation is not None and len(validation.examples) == 2 and len(validation.train) == len(built.train) - 2
    no_eval = run.trainer.__class__(eval_steps=0)
    assert build_validation(TASKS["instruction"], run.task, no_eval, tokenizer, built, seed=0) is None
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"Document {i} is about topic {i % 3}."}) + "\n" for i in range(20)))
    overrides = [f"task.data.train=[{text}]", f"task.data.eval.path={text}", "task.data.eval.fields=null"]
    run = _settings(tmp_path, "pretrain", *overrides, *EVAL)
    built = TASKS["pretrain"].build(run.task, tokenizer, 64)
    validation = build_validation(TASKS["pretrain"], run.task, run.trainer, tokenizer, built, seed=0)
    assert (
        validation is not None and validation.examples == built.eval_blocks and "position_ids" in built.eval_blocks[0]
    )


# -- sample prompts --------------------------------------------------------------------------------------------


def test_a_prompt_completion_example_is_prompted_with_what_precedes_its_labels() -> None:
    example = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [IGNORE_INDEX] * 3 + [4, 5, 6, 7]}
    prompt = sample_prompt(example, max_new_tokens=64)
    assert prompt is not None and prompt.prompt_ids == [1, 2, 3] and prompt.reference_ids == [4, 5, 6, 7]
    assert sample_prompt(example, max_new_tokens=2).reference_ids == [4, 5]  # type: ignore[union-attr]
    # a conversation: the first assistant turn is the reference
    chat = {"input_ids": list(range(10)), "labels": [IGNORE_INDEX] * 2 + [2, 3] + [IGNORE_INDEX] * 3 + [7, 8, 9]}
    assert sample_prompt(chat, 64).reference_ids == [2, 3]  # type: ignore[union-attr]


def test_raw_text_is_prompted_with_its_beginning() -> None:
    block = {"input_ids": list(range(100)), "labels": [IGNORE_INDEX, *range(1, 100)], "position_ids": list(range(100))}
    prompt = sample_prompt(block, max_new_tokens=16)
    assert prompt is not None and prompt.prompt_ids == list(range(TEXT_PROMPT_TOKENS))
    assert prompt.reference_ids == list(range(TEXT_PROMPT_TOKENS, TEXT_PROMPT_TOKENS + 16))
    short = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, 7, 8]}
    assert sample_prompt(short, 8).prompt_ids == [5, 6]  # type: ignore[union-attr]
    assert sample_prompt({"input_ids": [5], "labels": [5]}, 8) is None
    prompts = sample_prompts([{"input_ids": [5], "labels": [5]}, short, short, short], count=2, max_new_tokens=8)
    assert len(prompts) == 2


def test_samples_as_markdown_hold_prompt_generation_and_reference() -> None:
    text = as_markdown(12, [["Key: a\nValue:", " b", " c"]])
    assert "### step 12" in text and "    Key: a\n    Value:" in text and "    b" in text and "**reference**" in text


# -- early-stopping state --------------------------------------------------------------------------------------


def _state(counter: int, patience: int = 2) -> dict:
    args = {"early_stopping_patience": patience, "early_stopping_threshold": 0.0}
    return {
        "stateful_callbacks": {
            "EarlyStopping": {"args": args, "attributes": {"early_stopping_patience_counter": counter}}
        }
    }


def test_a_checkpoint_says_whether_early_stopping_ended_the_run() -> None:
    trainer = TrainerConfig(eval_steps=2, early_stopping_patience=2)
    assert saved_patience_counter(_state(1)["stateful_callbacks"]) == 1
    assert saved_patience_counter({"TrainerControl": {}}) == 0 and saved_patience_counter(None) == 0
    assert not stopped_early(_state(1), trainer) and stopped_early(_state(2), trainer)
    assert not stopped_early(_state(5), TrainerConfig())  # early stopping is off: the counter means nothing


def test_a_resumed_run_continues_the_patience_count_with_its_own_settings() -> None:
    callback = EarlyStopping(early_stopping_patience=3)
    resumed = SimpleNamespace(global_step=6, stateful_callbacks=_state(2)["stateful_callbacks"])
    callback.on_train_begin(SimpleNamespace(), resumed, SimpleNamespace())
    assert callback.early_stopping_patience_counter == 2 and callback.early_stopping_patience == 3
    fresh = EarlyStopping(early_stopping_patience=3)
    fresh.on_train_begin(SimpleNamespace(), SimpleNamespace(global_step=0, stateful_callbacks={}), SimpleNamespace())
    assert fresh.early_stopping_patience_counter == 0


def test_one_more_evaluation_without_improvement_stops_and_checkpoints() -> None:
    callback = EarlyStopping(early_stopping_patience=2)
    callback.early_stopping_patience_counter = 1
    args = SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False, save_strategy="steps")
    state = SimpleNamespace(best_metric=1.0, global_step=8, max_steps=20)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 1.5})
    assert control.should_training_stop and control.should_save and callback.stopped_at == 8
    better = EarlyStopping(early_stopping_patience=2)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    better.on_evaluate(args, state, control, metrics={"eval_loss": 0.5})
    assert not control.should_training_stop and better.stopped_at is None


def test_best_evaluation_is_the_first_lowest_finite_eval_loss() -> None:
    history = [{"loss": 3.0, "step": 1}, {"eval_loss": 2.0, "step": 2}, {"eval_loss": float("nan"), "step": 4}]
    history += [{"eval_loss": 1.5, "step": 6}, {"eval_loss": 1.5, "step": 8}, {"eval_loss": 1.7, "step": 10}]
    assert best_evaluation(history) == (6, 1.5)
    assert best_evaluation([{"loss": 1.0, "step": 1}]) == (None, None)
    assert json.dumps(best_evaluation(history))  # plain values for metrics.json


def test_training_arguments_follow_the_evaluation_keys(tmp_path: Path) -> None:
    from mora_train.training.trainer import training_arguments

    args = training_arguments(TrainerConfig(), 0, tmp_path)
    assert args.eval_strategy == "no" and not args.load_best_model_at_end and args.metric_for_best_model is None
    trainer = TrainerConfig(eval_steps=5, save_steps=10, load_best=True, micro_batch_size=2, batch_size=4)
    args = training_arguments(trainer, 0, tmp_path)
    assert (args.eval_strategy, args.eval_steps, args.per_device_eval_batch_size) == ("steps", 5, 2)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert args.prediction_loss_only  # the loss only: no logits gathered over the validation set
    # early stopping alone needs no checkpoint at evaluation steps
    args = training_arguments(TrainerConfig(eval_steps=3, save_steps=50, early_stopping_patience=2), 0, tmp_path)
    assert args.eval_steps == 3 and not args.load_best_model_at_end

"""The math (gsm8k/metamath) and instruction recipes on synthetic data: prompts, loss masks, EOS, limits, cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mora_train.core.errors import MoraTrainError
from mora_train.data import instruction as instruction_recipe
from mora_train.data import math as math_recipe
from mora_train.data.common import IGNORE_INDEX
from mora_train.models import byte_tokenizer
from mora_train.pipeline.run_config import read_run_config
from mora_train.tasks import TASKS
from tests.conftest import compose_config

GSM8K_ROWS = [
    {"question": "Natalia sold 48 clips. How many?", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 24"},
    {"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
]


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_problems(tmp_path: Path, task: str, *overrides: str) -> tuple[object, list[str]]:
    """The typed `task` section of a composed config, and every problem of the config."""
    run, problems = read_run_config(compose_config(["model=tiny-llama", f"task={task}", *overrides], tmp_path))
    return run.task, problems


def task_cfg(tmp_path: Path, task: str, *overrides: str):
    settings, problems = task_problems(tmp_path, task, f"task.cache_dir={tmp_path / 'cache'}", *overrides)
    assert problems == []
    assert type(settings) is TASKS[task].settings
    return settings


def build_math(cfg, tokenizer, max_seq_len: int):
    """The math recipe's data as the registry builds it (gold answers read by evaluation.answers)."""
    return TASKS[cfg.name].build(cfg, tokenizer, max_seq_len)


def build_instruction(cfg, tokenizer, max_seq_len: int):
    return TASKS["instruction"].build(cfg, tokenizer, max_seq_len)


def labelled_text(tokenizer, example: dict) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    )


def prompt_text(tokenizer, example: dict) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE_INDEX]
    )


@pytest.fixture
def gsm8k_files(tmp_path: Path) -> tuple[str, str]:
    return jsonl(tmp_path / "train.jsonl", GSM8K_ROWS), jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[::-1])


def test_gsm8k_loss_is_on_the_answer_and_eos_only(tmp_path: Path, gsm8k_files: tuple[str, str]) -> None:
    tokenizer = byte_tokenizer()
    cfg = task_cfg(tmp_path, "gsm8k", f"task.data.train={gsm8k_files[0]}", f"task.data.eval={gsm8k_files[1]}")
    data = build_math(cfg, tokenizer, 256)
    assert len(data.train) == 2
    first = data.train[0]
    assert prompt_text(tokenizer, first) == "Question: Natalia sold 48 clips. How many?\nAnswer:"
    # Calculator annotations stripped; the EOS is learned so the model stops after the answer.
    assert labelled_text(tokenizer, first) == " She sold 48/2 = 24.\n#### 24</s>"
    assert [p.gold.text for p in data.problems] == ["4", "24"]
    assert data.problems[0].where.endswith("test.jsonl line 1")


def test_metamath_maps_its_own_fields_and_evaluates_on_gsm8k_fields(
    tmp_path: Path, gsm8k_files: tuple[str, str]
) -> None:
    tokenizer = byte_tokenizer()
    train = jsonl(
        tmp_path / "mm.jsonl",
        [{"query": "What is 3*3?", "response": "3*3 = 9. The answer is: 9", "type": "GSM_Rephrased"}],
    )
    cfg = task_cfg(
        tmp_path,
        "metamath",
        "task.data.train.hub=null",
        f"task.data.train.path={train}",
        f"task.data.eval.path={gsm8k_files[1]}",
    )
    data = build_math(cfg, tokenizer, 512)
    assert "### Instruction:\nWhat is 3*3?\n\n### Response:" in prompt_text(tokenizer, data.train[0])
    assert labelled_text(tokenizer, data.train[0]) == " 3*3 = 9. The answer is: 9</s>"
    assert [p.question for p in data.problems] == ["What is 2+2?", "Natalia sold 48 clips. How many?"]


def test_too_long_drop_and_truncate_are_counted(tmp_path: Path, gsm8k_files: tuple[str, str], caplog) -> None:
    tokenizer = byte_tokenizer()
    # The Natalia example is 93 byte-tokens, the 2+2 one 45: max_seq_len=60 makes exactly one over-long.
    common = [f"task.data.train={gsm8k_files[0]}", f"task.data.eval={gsm8k_files[1]}", "task.cache_dir=null"]
    with caplog.at_level(logging.INFO):
        dropped = build_math(task_cfg(tmp_path, "gsm8k", *common, "task.too_long=drop"), tokenizer, 60)
    assert len(dropped.train) == 1 and dropped.stats["dropped"] == 1
    assert "of 2 examples, 0 were longer than max_seq_len=60 tokens and were truncated, 1 were dropped" in caplog.text
    truncated = build_math(task_cfg(tmp_path, "gsm8k", *common, "task.too_long=truncate"), tokenizer, 60)
    assert len(truncated.train) == 2 and truncated.stats["truncated"] == 1
    assert max(len(e["input_ids"]) for e in truncated.train) == 60
    with pytest.raises(MoraTrainError, match=r"no examples left: all 2 were dropped.*max_seq_len=20"):
        build_math(task_cfg(tmp_path, "gsm8k", *common, "task.too_long=drop"), tokenizer, 20)


def test_math_data_errors(tmp_path: Path, gsm8k_files: tuple[str, str]) -> None:
    tokenizer = byte_tokenizer()
    no_final = jsonl(tmp_path / "nofinal.jsonl", [{"question": "q", "answer": "no number here"}])
    cfg = task_cfg(tmp_path, "gsm8k", f"task.data.train={gsm8k_files[0]}", f"task.data.eval={no_final}")
    with pytest.raises(MoraTrainError, match=r"nofinal\.jsonl line 1: no final answer found"):
        build_math(cfg, tokenizer, 256)
    renamed = jsonl(tmp_path / "renamed.jsonl", [{"problem": "q", "solution": "#### 1"}])
    cfg = task_cfg(tmp_path, "gsm8k", f"task.data.train={renamed}", f"task.data.eval={gsm8k_files[1]}")
    with pytest.raises(
        MoraTrainError, match=r"renamed\.jsonl line 1: field 'question' is missing.*fields: problem, solution"
    ):
        build_math(cfg, tokenizer, 256)
    # eval.max_samples evaluates a prefix.
    cfg = task_cfg(
        tmp_path,
        "gsm8k",
        f"task.data.train={gsm8k_files[0]}",
        f"task.data.eval={gsm8k_files[1]}",
        "task.eval.max_samples=1",
    )
    assert len(TASKS["gsm8k"].build_eval(cfg, tokenizer, 256).problems) == 1


def test_math_config_problems(tmp_path: Path) -> None:
    _, found = task_problems(
        tmp_path,
        "gsm8k",
        "task.prompt_template='Q: {query}'",
        "task.too_long=cut",
        "task.eval.stop=nope",
        f"task.data.train={tmp_path / 'missing.jsonl'}",
        "task.data.eval=null",
        "task.data.fields.answer=null",
        "+task.promt_template=x",
    )
    problems = "\n".join(found)
    for expected in (
        "must contain {question}",
        "unknown fields ['query']",
        "`task.too_long=cut`",
        "`task.eval.stop",
        "missing.jsonl` does not exist",
        "`task.data.eval` is not set",
        "`task.data.fields.answer` is missing",
        "`task.promt_template` is not a known key (did you mean prompt_template",
    ):
        assert expected in problems


def test_every_task_parses_into_its_settings_class(tmp_path: Path) -> None:
    for name, task in TASKS.items():
        settings, problems = task_problems(tmp_path, name)
        assert problems == [] and type(settings) is task.settings and settings.name == name
    # A key of another recipe is refused with the keys this one knows.
    _, problems = task_problems(tmp_path, "uuid", "+task.too_long=drop", "task.num_pairs=0")
    assert any("`task.too_long` is not a known key" in p for p in problems)
    assert any("`task.num_pairs=0` must be a positive integer" in p for p in problems)


def test_tokenized_training_set_is_cached(tmp_path: Path, gsm8k_files: tuple[str, str], monkeypatch) -> None:
    tokenizer = byte_tokenizer()
    cfg = task_cfg(tmp_path, "gsm8k", f"task.data.train={gsm8k_files[0]}", f"task.data.eval={gsm8k_files[1]}")
    first = build_math(cfg, tokenizer, 256)
    assert first.stats["cache"] == "miss"
    real_load = math_recipe.load_records
    read = []
    monkeypatch.setattr(math_recipe, "load_records", lambda node, key: read.append(key) or real_load(node, key))
    second = build_math(cfg, tokenizer, 256)
    assert second.stats["cache"] == "hit" and second.train == first.train
    assert read == ["task.data.eval"]  # the training file was not read again
    # Another sequence length, template or data file is another entry.
    assert build_math(cfg, tokenizer, 128).stats["cache"] == "miss"
    Path(gsm8k_files[0]).write_text(json.dumps(GSM8K_ROWS[0]) + "\n")
    assert len(build_math(cfg, tokenizer, 256).train) == 1


# ---------------------------------------------------------------------------------- instruction

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ end }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def instruction_cfg(tmp_path: Path, rows: list[dict], *overrides: str):
    path = jsonl(tmp_path / "inst.jsonl", rows)
    return task_cfg(
        tmp_path,
        "instruction",
        f"task.data.train={path}",
        f"task.data.eval={path}",
        "task.data.fields.input=input",
        "task.data.fields.output=output",
        *overrides,
    )


def test_alpaca_records_use_the_documented_fallback(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    rows = [{"instruction": "Translate", "input": "chat", "output": "cat"}, {"instruction": "Say hi", "output": "hi"}]
    data = build_instruction(instruction_cfg(tmp_path, rows), tokenizer, 256)
    assert prompt_text(tokenizer, data.train[0]) == "### User:\nTranslate\n\nchat\n\n### Assistant:\n"
    assert labelled_text(tokenizer, data.train[0]) == "cat</s>"
    assert prompt_text(tokenizer, data.train[1]) == "### User:\nSay hi\n\n### Assistant:\n"  # no input: no blank block
    assert (
        instruction_recipe.fallback_prompt(data.eval_conversations[1].messages[:1])
        == "### User:\nSay hi\n\n### Assistant:\n"
    )


def test_chat_records_multi_turn_fallback_and_sharegpt(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"messages": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hey"}]},
    ]
    data = build_instruction(instruction_cfg(tmp_path, rows), tokenizer, 256)
    assert labelled_text(tokenizer, data.train[0]) == "2</s>4</s>"
    assert tokenizer.decode(data.train[0]["input_ids"]) == (
        "### System:\nBe brief.\n\n### User:\n1+1?\n\n### Assistant:\n2</s>\n\n### User:\n2+2?\n\n### Assistant:\n4</s>"
    )
    assert labelled_text(tokenizer, data.train[1]) == "hey</s>"


@pytest.mark.parametrize("end,expected", [("</s>", "4</s>\n"), ("<|end|>", "4<|end|>\n</s>")])
def test_chat_template_labels_each_assistant_turn_and_ends_with_eos(tmp_path: Path, end: str, expected: str) -> None:
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ end }}", end)
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    data = build_instruction(instruction_cfg(tmp_path, rows), tokenizer, 256)
    assert data.stats["chat_template"] is True
    # The turn as the template renders it; EOS added when the template's end of turn is not EOS.
    assert labelled_text(tokenizer, data.train[0]) == expected
    assert prompt_text(tokenizer, data.train[0]) == f"<|user|>\n2+2?{end}\n<|assistant|>\n"
    fallback = build_instruction(instruction_cfg(tmp_path, rows, "task.use_chat_template=false"), tokenizer, 256)
    assert labelled_text(tokenizer, fallback.train[0]) == "4</s>"


def test_instruction_data_errors(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    with pytest.raises(MoraTrainError, match=r"inst\.jsonl line 1: the conversation has no assistant message"):
        build_instruction(
            instruction_cfg(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}]), tokenizer, 256
        )
    with pytest.raises(MoraTrainError, match=r"line 1: message 0 has role 'bot'"):
        build_instruction(instruction_cfg(tmp_path, [{"messages": [{"role": "bot", "content": "x"}]}]), tokenizer, 256)
    with pytest.raises(MoraTrainError, match=r"field 'output' is missing.*fields: instruction, response"):
        build_instruction(instruction_cfg(tmp_path, [{"instruction": "i", "response": "r"}]), tokenizer, 256)
    with pytest.raises(MoraTrainError, match="has no chat template"):
        build_instruction(
            instruction_cfg(tmp_path, [{"instruction": "i", "output": "o"}], "task.use_chat_template=true"),
            tokenizer,
            256,
        )

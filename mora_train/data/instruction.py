"""Instruction tuning on Alpaca-style (`instruction`/`input`/`output`) and chat (`messages`) records.

Every record becomes a list of chat messages ({role, content}; roles system/user/assistant; ShareGPT's
{from: human|gpt, value} is accepted too). An Alpaca record is one user turn (the instruction, then a
blank line and the input when there is one) and one assistant turn (the output).

Rendering:
  - a chat template (`task.chat_template`: the tokenizer's own, a built-in such as chatml, or a .jinja file;
    data/chat_templates.py) when there is one (`task.use_chat_template: auto`), else
  - the fallback format (also forced by `use_chat_template: false`):

        ### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}</s>

    with turns separated by a blank line and the tokenizer's EOS after every assistant turn.

The loss is on the assistant turns only (`task.train_on=all_assistant`), or on the last one
(`last_assistant`). So that the tuned model stops, every assistant turn's labelled tokens include
the EOS token: the fallback appends it; with a chat template whose end of turn is not the EOS token
(e.g. Qwen's `<|im_end|>` vs `<|endoftext|>`), EOS is inserted after the turn's rendered text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from mora_train.config.schema import setting
from mora_train.core.errors import MoraTrainError
from mora_train.data.cache import tokenizer_fingerprint
from mora_train.data.chat_templates import (
    TOKENIZER_TEMPLATE,
    TrainOn,
    chat_template_problem,
    encode_chat,
    load_chat_template,
    render,
    warn_about_unknown_markers,
)
from mora_train.data.common import IGNORE_INDEX, LengthReport, fit_to_length, log_length_report, require_examples
from mora_train.data.config import DataRecipe, Sources, TaskData
from mora_train.data.prepare import training_set
from mora_train.data.sources import Record, as_text, has_field, load_records, map_fields

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
FALLBACK_TURN_SEPARATOR = "\n\n"


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str


@dataclass
class InstructionData:
    train: Sequence[dict]
    eval_examples: list[dict]  # tokenized held-out conversations (loss on responses)
    eval_conversations: list[Conversation]  # the same, as messages (for generated samples)
    stats: dict[str, Any] = field(default_factory=dict)


class InstructionTaskData(TaskData):
    fields: dict[str, str | None] = setting(
        factory=lambda: {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages"},
        help="recipe field (instruction, input, output; messages for chat records) -> your field: a name, a dotted "
        'path (instances.0.input) or a template ("{a} {b}")',
    )


class InstructionRecipe(DataRecipe):
    """Instruction tuning (task=instruction; tasks/instruction.py adds the evaluation settings)."""

    data: InstructionTaskData = setting(help="the training and held-out conversations and the field mapping")
    format: Literal["auto", "alpaca", "chat"] = setting(
        default="auto",
        help="auto: a record with the `messages` field is chat, otherwise Alpaca; or force alpaca / chat",
    )
    use_chat_template: Literal["auto", True, False] = setting(
        default="auto",
        help="auto: the tokenizer's chat template when it has one, else the fallback format; true: require "
        "it; false: the fallback",
    )
    chat_template: str = setting(
        default=TOKENIZER_TEMPLATE,
        help="tokenizer: the tokenizer's own; a built-in (chatml, llama3, qwen); or a .jinja file's path",
    )
    train_on: TrainOn = setting(
        default="all_assistant", help="the loss on every assistant turn (all_assistant) or the last (last_assistant)"
    )
    system_prompt: str | None = setting(
        default=None, help="prepended as a system message to conversations that have none"
    )

    def check(self, prefix: str) -> list[str]:
        problems = []
        problem = chat_template_problem(self.chat_template, f"{prefix}.chat_template")
        if problem:
            problems.append(problem)
        elif self.chat_template != TOKENIZER_TEMPLATE and self.use_chat_template is False:
            problems.append(
                f"`{prefix}.chat_template={self.chat_template}` and `{prefix}.use_chat_template=false` contradict "
                f"each other (false means the '### User:' fallback format); drop one of them"
            )
        return problems


# ----------------------------------------------------------------------------------------------
# Records -> conversations


def _chat_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise MoraTrainError(
            f"{where}: `messages` must be a non-empty list of {{role, content}} objects, got {str(value)[:80]!r}"
        )
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, dict) and "from" in message and "value" in message:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(str(message["from"])), message["value"]
        elif isinstance(message, dict) and "role" in message and "content" in message:
            role, content = message["role"], message["content"]
        else:
            keys = ", ".join(message) if isinstance(message, dict) else type(message).__name__
            raise MoraTrainError(f"{where}: message {i} needs `role` and `content` (has: {keys})")
        if role not in ROLES:
            raise MoraTrainError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise MoraTrainError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise MoraTrainError(f"{where}: the conversation has no assistant message to learn from")
    return messages


def to_conversation(record: Record, settings: InstructionRecipe, fields: dict[str, str | None]) -> Conversation:
    fmt = settings.format
    if fmt == "auto":
        fmt = "chat" if has_field(record, fields, "messages") else "alpaca"
    if fmt == "chat":
        values = map_fields(record, fields, "task.data.fields", ("messages",))
        messages = _chat_messages(values["messages"], record.where)
    else:
        values = map_fields(record, fields, "task.data.fields", ("instruction", "output"), ("input",))
        user = as_text(values["instruction"])
        extra = as_text(values.get("input", "")).strip()
        if extra:
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": as_text(values["output"])}]
    if settings.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": settings.system_prompt}, *messages]
    return Conversation(messages, record.where)


# ----------------------------------------------------------------------------------------------
# Conversations -> tokens


def choose_chat_template(settings: InstructionRecipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """Set task.chat_template on the tokenizer (unless it is the tokenizer's own), so that everything rendering
    a conversation (training data, generation prompts, the tokenizer saved with the merged model) uses it."""
    template = load_chat_template(settings.chat_template)
    if template is not None and template != tokenizer.chat_template:
        warn_about_unknown_markers(template, settings.chat_template, tokenizer)
        tokenizer.chat_template = template


def uses_chat_template(settings: InstructionRecipe, tokenizer: PreTrainedTokenizerBase) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.use_chat_template is True and not has_template:
        raise MoraTrainError(
            "`task.use_chat_template=true` but this tokenizer has no chat template; use task.use_chat_template=auto "
            "(falls back to the documented '### User:/### Assistant:' format) or a model whose tokenizer has one"
        )
    return has_template and settings.use_chat_template is not False  # "auto" or True


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def fallback_prompt(messages: list[dict[str, str]]) -> str:
    """Fallback rendering of a conversation so far, ending with the assistant header (a generation prompt)."""
    parts = [FALLBACK_HEADERS[m["role"]] + m["content"] for m in messages]
    return FALLBACK_TURN_SEPARATOR.join([*parts, FALLBACK_HEADERS["assistant"]])


def encode_fallback(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], train_on: TrainOn = "all_assistant"
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        head = (FALLBACK_TURN_SEPARATOR if i else "") + FALLBACK_HEADERS[message["role"]]
        if message["role"] == "assistant":
            head_ids = _ids(tokenizer, head, special=(i == 0))
            body_ids = [*_ids(tokenizer, message["content"], special=False), tokenizer.eos_token_id]
            learned = train_on == "all_assistant" or i == last
            input_ids += head_ids + body_ids
            labels += [IGNORE_INDEX] * len(head_ids) + (body_ids if learned else [IGNORE_INDEX] * len(body_ids))
        else:
            ids = _ids(tokenizer, head + message["content"], special=(i == 0))
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, chat_template: bool, train_on: TrainOn
) -> tuple[list[int], list[int]]:
    if chat_template:
        return encode_chat(tokenizer, conversation.messages, conversation.where, train_on)
    return encode_fallback(tokenizer, conversation.messages, train_on)


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], chat_template: bool) -> str:
    return render(tokenizer, messages, generation_prompt=True) if chat_template else fallback_prompt(messages)


def load_conversations(
    settings: InstructionRecipe, spec: Sources | None, key: str, limit: int | None = None
) -> list[Conversation]:
    records = load_records(spec, key)
    return [to_conversation(r, settings, settings.data.fields) for r in (records[:limit] if limit else records)]


def tokenize(
    conversations: list[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: bool,
    max_seq_len: int,
    too_long: str,
    train_on: TrainOn = "all_assistant",
) -> tuple[list[dict], LengthReport]:
    report = LengthReport()
    examples = []
    for conversation in conversations:
        ids, labels = encode(tokenizer, conversation, chat_template, train_on)
        example = fit_to_length(ids, labels, max_seq_len, too_long, report)
        if example is not None:
            examples.append(example)
    return examples, report


def _eval_part(
    settings: InstructionRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, eval_limit: int | None
) -> tuple[list[Conversation], list[dict]]:
    chat_template = uses_chat_template(settings, tokenizer)
    conversations = load_conversations(settings, settings.data.eval, "task.data.eval", eval_limit)
    examples, report = tokenize(conversations, tokenizer, chat_template, max_seq_len, "truncate", settings.train_on)
    log_length_report(f"{settings.name} held-out set", report, max_seq_len)
    require_examples(examples, "task.data.eval", report, max_seq_len, "truncate")
    return conversations, examples


def build(
    settings: InstructionRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, eval_limit: int | None
) -> InstructionData:
    """Training examples and the first `eval_limit` held-out conversations (task.eval.max_samples)."""
    choose_chat_template(settings, tokenizer)
    chat_template = uses_chat_template(settings, tokenizer)
    conversations, eval_examples = _eval_part(settings, tokenizer, max_seq_len, eval_limit)

    def encode_record(record: Record) -> tuple[list[int], list[int]]:
        conversation = to_conversation(record, settings, settings.data.fields)
        return encode(tokenizer, conversation, chat_template, settings.train_on)

    key = {
        "recipe": "instruction",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": chat_template,
        # The template text itself (task.chat_template may name a file whose text changes between runs).
        "template": getattr(tokenizer, "chat_template", None) if chat_template else None,
        "settings": {
            "format": settings.format,
            "system_prompt": settings.system_prompt,
            "too_long": settings.too_long,
            "train_on": settings.train_on,
        },
        "fields": settings.data.fields,
    }
    train, meta = training_set(settings, encode_record, key, max_seq_len)
    return InstructionData(train, eval_examples, conversations, {**meta, "chat_template": chat_template})


def build_eval(
    settings: InstructionRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, eval_limit: int | None
) -> InstructionData:
    choose_chat_template(settings, tokenizer)
    conversations, eval_examples = _eval_part(settings, tokenizer, max_seq_len, eval_limit)
    return InstructionData([], eval_examples, conversations, {"chat_template": uses_chat_template(settings, tokenizer)})

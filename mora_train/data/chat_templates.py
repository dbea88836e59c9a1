"""Chat templates for instruction tuning: which one (`task.chat_template`) and where its loss goes.

`task.chat_template` is `tokenizer` (the tokenizer's own template, the default), the name of a built-in
(configs/chat_templates/NAME.jinja: chatml, llama3, qwen) or the path of a `.jinja` file. A chosen template is
set on the tokenizer, so generation during evaluation and the tokenizer saved with the merged model use it too.

The loss goes on the assistant turns (`task.train_on=all_assistant`) or on the last one only (`last_assistant`),
found in one of two ways:

- the template's `{% generation %}...{% endgeneration %}` markers, when it has them (the built-ins do):
  the conversation is rendered once and tokenized with `return_assistant_tokens_mask=True`, so a template that
  renders earlier turns differently once later ones follow (Qwen3's reasoning, dates) works too;
- otherwise by rendering the conversation up to each assistant turn and up to its end: the turn is the
  difference, which needs a prefix-stable template (ChatML, Llama, SmolLM2's are); one that is not is refused.

Either way every learned turn ends with the tokenizer's EOS: when the template's end of turn is another token
(ChatML's `<|im_end|>` with a tokenizer whose EOS is `<|endoftext|>`), EOS is added after the turn, so the tuned
model stops where generation expects it to.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from mora_train.configs import CONFIG_DIR
from mora_train.core.errors import MoraTrainError
from mora_train.data.common import IGNORE_INDEX

log = logging.getLogger(__name__)

TOKENIZER_TEMPLATE = "tokenizer"
BUILTIN_DIR = CONFIG_DIR / "chat_templates"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
SPECIAL_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")  # <|im_start|>, <|eot_id|>, ...
TrainOn = Literal["all_assistant", "last_assistant"]
Messages = list[dict[str, str]]


def builtin_templates() -> dict[str, Path]:
    """The shipped templates by name (configs/chat_templates/NAME.jinja)."""
    return {path.stem: path for path in sorted(BUILTIN_DIR.glob("*.jinja"))}


def _is_path(spec: str) -> bool:
    return spec.endswith(".jinja") or "/" in spec or spec.startswith("~")


def chat_template_problem(spec: str, key: str) -> str | None:
    """What is wrong with a `task.chat_template` value, found without loading anything (None: nothing)."""
    if spec == TOKENIZER_TEMPLATE or spec in builtin_templates():
        return None
    names = ", ".join(builtin_templates())
    if not _is_path(spec):
        return (
            f"`{key}={spec}` is neither `tokenizer` (the tokenizer's own template), a built-in template ({names}) "
            f"nor a path to a .jinja file; use one of those, e.g. {key}=chatml or {key}=./my_template.jinja"
        )
    if not Path(spec).expanduser().is_file():
        return (
            f"`{key}={spec}`: no such template file; give an existing .jinja file, `tokenizer` for the tokenizer's "
            f"own template, or a built-in ({names})"
        )
    return None


def load_chat_template(spec: str, key: str = "task.chat_template") -> str | None:
    """The template text `spec` names (None: the tokenizer's own)."""
    problem = chat_template_problem(spec, key)
    if problem:
        raise MoraTrainError(problem)
    if spec == TOKENIZER_TEMPLATE:
        return None
    path = builtin_templates().get(spec) or Path(spec).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MoraTrainError(f"`{key}={spec}`: cannot read {path} ({err}); give a readable UTF-8 .jinja file") from None


def warn_about_unknown_markers(template: str, spec: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """A template's <|...|> markers that the tokenizer splits into pieces are learned as text: say so once."""
    unknown = [
        marker
        for marker in dict.fromkeys(SPECIAL_MARKER.findall(template))
        if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1
    ]
    if unknown:
        log.warning(
            "task.chat_template=%s writes %s, which this tokenizer does not hold as tokens: they are split into "
            "ordinary tokens and learned as text (and a token may straddle a marker and the text after it). The "
            "template the model was trained with (task.chat_template=tokenizer) is usually the better choice",
            spec,
            ", ".join(unknown),
        )


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and GENERATION_MARKER.search(str(template)) is not None


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s in a 0/1 mask."""
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def encode_with_markers(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, where: str, train_on: TrainOn
) -> tuple[list[int], list[int]]:
    """The conversation rendered once; labels on the tokens inside the template's generation markers."""
    encoded = _apply(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    spans = _spans(mask)
    if not spans:
        raise MoraTrainError(
            f"{where}: the chat template's {{% generation %}} markers enclose no token of this conversation, so "
            "there is nothing to learn; put them around each assistant reply in the template (see "
            "configs/chat_templates/chatml.jinja)"
        )
    learned = spans[-1:] if train_on == "last_assistant" else spans
    input_ids: list[int] = []
    labels: list[int] = []
    done = 0
    for start, end in spans:
        turn = ids[start:end]
        if tokenizer.eos_token_id not in turn:
            turn.append(tokenizer.eos_token_id)
        input_ids += ids[done:start] + turn
        labels += [IGNORE_INDEX] * (start - done) + (turn if (start, end) in learned else [IGNORE_INDEX] * len(turn))
        done = end
    return input_ids + ids[done:], labels + [IGNORE_INDEX] * (len(ids) - done)


def _apply(tokenizer: PreTrainedTokenizerBase, messages: Messages, where: str, **kwargs: Any) -> Any:
    """tokenizer.apply_chat_template; a template that fails on this conversation is the template's error."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as err:
        raise MoraTrainError(
            f"{where}: the chat template fails on this conversation ({type(err).__name__}: {err}); fix the template "
            "(task.chat_template) or choose another one: tokenizer, a built-in, or a .jinja file"
        ) from None


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool, where: str = "a conversation"
) -> str:
    if not messages:
        return ""
    return str(_apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=generation_prompt))


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_by_rendering(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, where: str, train_on: TrainOn
) -> tuple[list[int], list[int]]:
    """Tokens of the templated conversation; labels on the assistant turns as the template renders them.

    A turn's tokens are found as the difference between the conversation rendered up to the turn
    (with the generation prompt) and up to its end, which needs the template to be prefix-stable
    (true of ChatML, Llama, Qwen, SmolLM templates); one that is not is reported, not guessed at.
    """
    eos = tokenizer.eos_token_id
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    input_ids: list[int] = []
    labels: list[int] = []
    previous = ""  # text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True, where=where)
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False, where=where)
        if not before.startswith(previous) or not upto.startswith(before):
            raise MoraTrainError(
                f"{where}: this chat template renders earlier turns differently once later turns are added, so "
                "the assistant's tokens cannot be located; use a template with {% generation %} markers (a "
                "built-in such as task.chat_template=chatml, or a .jinja file), or task.use_chat_template=false "
                "for the documented fallback format"
            )
        context_ids = _ids(tokenizer, before[len(previous) :])
        turn_ids = _ids(tokenizer, upto[len(before) :])
        if eos not in turn_ids:
            turn_ids.append(eos)  # the template's end of turn is not EOS: add it so generation stops
        learned = train_on == "all_assistant" or i == last
        input_ids += context_ids + turn_ids
        labels += [IGNORE_INDEX] * len(context_ids) + (turn_ids if learned else [IGNORE_INDEX] * len(turn_ids))
        previous = upto
    return input_ids, labels


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, where: str, train_on: TrainOn
) -> tuple[list[int], list[int]]:
    """The tokenizer's (chosen) template: through its generation markers where it has them, else by rendering."""
    if has_generation_markers(tokenizer.chat_template):
        return encode_with_markers(tokenizer, messages, where, train_on)
    return encode_by_rendering(tokenizer, messages, where, train_on)

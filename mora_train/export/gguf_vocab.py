"""A model folder's tokenizer as llama.cpp's GGUF tokenizer metadata (`mora-train-export --format gguf`).

A byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen2, the tiny models' byte tokenizer) is written as llama.cpp's
`gpt2` tokenizer: the token strings in their byte-level spelling, each with its type (normal, control for the
special tokens, user-defined for other added tokens, unused for embedding rows no token names), and the merges.
llama.cpp splits text with a fixed regex per *pre-tokenizer name* before it applies the merges, so the name
written must split text as the model's tokenizer did in training. It is chosen by behaviour, not by name: each
pre-tokenizer llama.cpp knows by a name (those below) is put in front of the tokenizer's own vocabulary and
merges, and the first that encodes a probe text exactly as the tokenizer does is the one written. A tokenizer
that none of them reproduces is refused rather than written with a split that would tokenize differently.

The special token ids, the merges and the chat template come from the folder's files through the `gguf`
package's own `SpecialVocab`; whether BOS / EOS are added is measured on the tokenizer (llama.cpp and
transformers' GGUF reader both follow the flags written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerBase

from mora_train.core.errors import MoraTrainError

# Exercises what tells the pre-tokenizers apart: runs of digits, contractions in both cases, punctuation
# runs, whitespace and newline runs, letters of several scripts, emoji and hex strings like the UUID task's.
PROBE_TEXT = (
    "Hello world! It's 2024-12-06; I'M sure we've 3.14159 and 1234567 items...\n\n   indented\tTab\r\n"
    "ΑΒΓ δέλτα 中文テキスト한국어 🚀🚀 don't WON'T x=y+1; f(a,b) ''' \"\"\" ------====== 0x1F "
    "3f2a91bc-77e2-4c1d-9a0b-5e6f7a8b9c0d  trailing   \n"
)

# Meta's Llama 3 split (llama.cpp: `llama-bpe`).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _qwen2_split() -> Any:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return _split_then_bytes(PRETOKENIZE_REGEX)


# llama.cpp's pre-tokenizer names (its tokenizer.ggml.pre values) with the split each one applies, as a
# `tokenizers` pre-tokenizer; in order of preference when several reproduce a tokenizer (a vocabulary without
# merges tokenizes every split the same way).
PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    # GPT-2's regex (transformers' ByteLevel with use_regex=True): SmolLM2 as transformers reads its GGUF
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # every digit on its own, then GPT-2's regex: SmolLM2's own tokenizer.json
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_SPLIT),
    "qwen2": _qwen2_split,
}


@dataclass
class GGUFVocab:
    """What the GGUF file says about the tokenizer (the export report records model and pre)."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre: one of PRE_TOKENIZERS
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]
    special: gguf.SpecialVocab  # special token ids, add_bos / add_eos, chat template

    @property
    def chat_template(self) -> str | None:
        template = self.special.chat_template
        return template if isinstance(template, str) else None


def _backend_model(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MoraTrainError(
            f"the tokenizer ({type(tokenizer).__name__}) has no `tokenizers` backend (tokenizer.json), which the "
            "GGUF export reads its vocabulary and merges from; save the model with a fast tokenizer"
        )
    return dict(json.loads(backend.to_str())["model"])


def _splits(pre_tokenizer: Any) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(PROBE_TEXT)] if pre_tokenizer is not None else []


def byte_level_pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    """The name of llama.cpp's pre-tokenizer that tokenizes like `tokenizer` (see the module docstring).

    First the one that splits the probe text into the same pieces as the tokenizer's own pre-tokenizer (two
    splits can tokenize alike with one vocabulary, e.g. single digits when no merge joins digits: the same split
    is the one that stays alike for every text); else the first whose tokens are the same (a vocabulary without
    merges, where the split does not matter)."""
    backend = tokenizer.backend_tokenizer
    own_splits = _splits(backend.pre_tokenizer)
    if own_splits:
        for name, build in PRE_TOKENIZERS.items():
            if _splits(build()) == own_splits:
                return name
    expected = backend.encode(PROBE_TEXT, add_special_tokens=False).ids
    for name, build in PRE_TOKENIZERS.items():
        candidate = Tokenizer.from_str(backend.to_str())
        candidate.pre_tokenizer = build()
        if candidate.encode(PROBE_TEXT, add_special_tokens=False).ids == expected:
            return name
    raise MoraTrainError(
        "the model's tokenizer splits text like none of the llama.cpp pre-tokenizers mora-train-export can name "
        f"({', '.join(PRE_TOKENIZERS)}): written with any of them, llama.cpp would tokenize differently from the "
        "model's training. Convert RUN_DIR/merged with llama.cpp's own convert_hf_to_gguf.py instead"
    )


def _token_types(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for every embedding row (llama.cpp needs one token per row)."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise MoraTrainError(
            f"the tokenizer has token id {max(by_id)}, beyond the model's {vocab_size} embedding rows; the merged "
            "model and its tokenizer do not belong together"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")  # an embedding row no token names (vocabularies padded to a multiple)
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _adds_special(tokenizer: PreTrainedTokenizerBase) -> dict[str, bool]:
    """Whether the tokenizer puts BOS before / EOS after a text, measured on one."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) - len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = extra > 0 and bos is not None and with_special[0] == bos and (not plain or plain[0] != bos)
    adds_eos = extra > 0 and eos is not None and with_special[-1] == eos and (not plain or plain[-1] != eos)
    return {"bos": bool(adds_bos), "eos": bool(adds_eos)}


def read_vocab(model_dir: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of the model folder `model_dir` (whose tokenizer `tokenizer` is)."""
    model = _backend_model(tokenizer)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MoraTrainError(
            f"the model's tokenizer is a {model.get('type')} tokenizer"
            f"{' with byte fallback (sentencepiece-style)' if model.get('byte_fallback') else ''}; the GGUF export "
            "writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2). Convert RUN_DIR/merged with llama.cpp's "
            "convert_hf_to_gguf.py instead"
        )
    pre = byte_level_pre_tokenizer(tokenizer)
    tokens, types = _token_types(tokenizer, vocab_size)
    special = gguf.SpecialVocab(model_dir, load_merges=bool(model.get("merges")), n_vocab=vocab_size)
    special.add_special_token = _adds_special(tokenizer)
    # add_vocab writes the merges itself, also when there are none
    merges, special.merges, special.load_merges = list(special.merges), [], False
    return GGUFVocab("gpt2", pre, tokens, types, merges, special)


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # llama.cpp refuses a gpt2 tokenizer without a merges key, even one with nothing to merge (the byte
    # tokenizer): an empty list is written then, with its element type, which GGUFWriter.add_array cannot do.
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
    )
    vocab.special.add_to_gguf(writer, quiet=True)

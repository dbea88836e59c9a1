"""Fingerprints of tokenized data: the tokenizer's and a recipe's key, so that a second run starts fast.

The key hashes: the tokenizer (class, vocabulary/merges, special tokens, chat template), the
recipe's settings that shape the tokens (templates, field mapping, packing, too_long policy, ...),
`max_seq_len`, and the data itself (local files by resolved path, size and modification time;
hub datasets by id, config, split and revision). Change any of them and the cache misses.

Data prepared inside 🤗 datasets (data/prepare.py, data/corpus.py) hands this key to `Dataset.map` as its
fingerprint: datasets keeps the result in its cache folder. `cached` keeps a list built in Python instead, as
`.pt` files of flat integer tensors (loaded with torch.load(weights_only=True)), written to a temp file and
renamed so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mora_train.core.io import write_file_atomically

log = logging.getLogger(__name__)

# Bump when the tokenization code changes in a way the key cannot see.
CACHE_FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything in the tokenizer that changes token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # Slow tokenizers have no backend: the vocabulary is what we can see.
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        vocab,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "chat_template", None)),
        str(getattr(tokenizer, "add_bos_token", None)),
        str(getattr(tokenizer, "add_eos_token", None)),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"version": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _save(path: Path, examples: list[dict[str, list[int]]], meta: dict[str, Any]) -> None:
    keys = sorted(examples[0]) if examples else []
    payload: dict[str, Any] = {
        "meta": json.dumps(meta),
        "keys": keys,
        "lengths": torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int64),
    }
    for key in keys:
        payload[key] = torch.tensor([t for e in examples for t in e[key]], dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda tmp: torch.save(payload, tmp))


def _load(path: Path) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    payload = torch.load(path, weights_only=True)
    lengths = payload["lengths"].tolist()
    columns = {key: payload[key].tolist() for key in payload["keys"]}
    examples, start = [], 0
    for length in lengths:
        examples.append({key: column[start : start + length] for key, column in columns.items()})
        start += length
    return examples, json.loads(payload["meta"])


def cached(
    cache_dir: str | None,
    name: str,
    key_parts: dict[str, Any],
    build: Callable[[], tuple[list[dict[str, list[int]]], dict[str, Any]]],
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """`build()` -> (examples, meta), or the cached result of an earlier identical build. cache_dir=None disables."""
    if not cache_dir:
        return build()
    path = Path(cache_dir).expanduser() / f"{name}-{cache_key(key_parts)}.pt"
    if path.is_file():
        try:
            examples, meta = _load(path)
        except Exception as err:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
            log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, err)
        else:
            log.info("%s: loaded %d tokenized examples from cache %s", name, len(examples), path)
            return examples, {**meta, "cache": "hit", "cache_path": str(path)}
    examples, meta = build()
    try:
        _save(path, examples, meta)
        log.info("%s: cached %d tokenized examples at %s", name, len(examples), path)
    except OSError as err:
        log.warning("could not write dataset cache %s (%s); continuing without it", path, err)
    return examples, {**meta, "cache": "miss", "cache_path": str(path)}

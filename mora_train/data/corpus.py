"""Raw text through 🤗 datasets, for pretraining: documents read, tokenized, mixed and packed into blocks.

The same steps, two ways:

* `packed_blocks` (map-style): each source's documents are tokenized by `Dataset.map` in `task.num_proc` processes
  and packed by another `map`, both kept in datasets' cache by fingerprint; a second run finds them there.
* `stream_blocks` (`task.data.streaming=true`): an `IterableDataset` doing the same batch by batch as training reads
  it, so memory stays the same whatever the corpus size. It starts over when the mix ends (the Trainer stops at
  trainer.max_steps), and reads the same blocks in the same order every time, so a resumed run goes on at the
  position it had reached.

Documents are packed a batch at a time (PACK_DOCUMENTS of them): the blocks are full but for the last of each batch,
and both ways give the same blocks for the same data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mora_train.core.errors import MoraTrainError
from mora_train.data.cache import cache_key
from mora_train.data.common import IGNORE_INDEX
from mora_train.data.config import DataSource, MixingStop, resolve_sources, source_weights
from mora_train.data.prepare import (
    Examples,
    Selected,
    cache_folder,
    hub_cache_folder,
    map_cached,
    mix,
    select_rows,
    token_features,
)
from mora_train.data.readers import Part, file_error, quiet_datasets, quiet_logs, read_source
from mora_train.data.sources import (
    Record,
    Where,
    as_text,
    fingerprint_sources,
    id_filters,
    lookup,
    map_fields,
    record_values,
)

PACK_DOCUMENTS = 1000  # documents packed together: one shorter block per this many documents


def pack_documents(documents: list[list[int]], block_size: int) -> list[dict[str, list[int]]]:
    """Concatenate documents (each already ending in EOS) and cut into blocks of `block_size` tokens.

    position_ids restart at 0 at each document start and at each block start; the label of every
    segment's first token is IGNORE_INDEX (it would be predicted from the previous document).
    """
    blocks: list[dict[str, list[int]]] = []
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    for doc in documents:
        offset = 0
        while offset < len(doc):
            take = min(block_size - len(ids), len(doc) - offset)
            piece = doc[offset : offset + take]
            ids += piece
            positions += list(range(take))
            labels += [IGNORE_INDEX, *piece[1:]]
            offset += take
            if len(ids) == block_size:
                blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
                ids, positions, labels = [], [], []
    if len(ids) >= 2:  # a last, shorter block (padded by the collator) when it holds something to predict
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return blocks


def _pack_batch(batch: dict[str, list], *, block_size: int) -> dict[str, list]:
    blocks = pack_documents(batch["input_ids"], block_size)
    return {name: [b[name] for b in blocks] for name in ("input_ids", "labels", "position_ids")}


def _document_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    part: Part,
    source: DataSource,
    rows: list[int] | None,
    fields: dict[str, str | None],
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    filters: list[tuple[str, str, set[str]]],
) -> dict[str, list]:
    """datasets.map's function: records -> the token ids of their text, ending with EOS ([] for a blank text).
    `filters`: the source's keep_if_in/drop_if_in with their ids, applied here (a stream has no rows selected
    ahead; map-style data has them applied already)."""
    texts = []
    columns = list(batch)
    for index, values in zip(indices, zip(*(batch[c] for c in columns), strict=True), strict=True):
        where = Where(part.locator, rows[index] if rows is not None else index)
        record = Record(record_values(dict(zip(columns, values, strict=True))), where, source.fields)
        if filters and not all(
            (str(lookup(record, field, f"{key}.{name}.field")) in ids) == (name == "keep_if_in")
            for name, field, ids in filters
        ):
            continue
        texts.append(as_text(map_fields(record, fields, "task.data.fields", ("text",))["text"]))
    eos = tokenizer.eos_token_id
    encoded = tokenizer([t for t in texts if t.strip()], add_special_tokens=True)["input_ids"] if texts else []
    documents: list[list[int]] = []
    position = 0
    for text in texts:
        if not text.strip():
            documents.append([])
            continue
        ids = list(encoded[position])
        position += 1
        documents.append(ids if ids and ids[-1] == eos else [*ids, eos])
    return {"input_ids": documents}


def _has_tokens(ids: list[list[int]]) -> list[bool]:
    return [bool(i) for i in ids]


def _token_count(dataset: Any) -> int:
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["input_ids"]
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0)


def packed_blocks(
    spec: Any,
    key: str,
    tokenizer_key: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    fields: dict[str, str | None],
    block_size: int,
    limit: int | None,
    cache_dir: str | None,
    num_proc: int | None,
    mixing: tuple[MixingStop, int] | None,
) -> tuple[Examples, dict[str, Any]]:
    """The text of `spec` (its first `limit` documents) tokenized and packed, in datasets' cache; and its numbers:
    documents, tokens, blocks, cache (hit when every map was found there). `mixing`: weighted sources are mixed
    (training data), or None: read in order."""
    sources, problems = resolve_sources(spec, key)
    if problems:
        raise MoraTrainError("; ".join(problems))
    folder = cache_folder(cache_dir)
    hits: list[bool] = []
    per_source = []
    for source in sources:
        mapped = []
        parts = read_source(source, key, streaming=False, cache_dir=folder, hub_cache_dir=hub_cache_folder(cache_dir))
        for index, selected in enumerate(select_rows(source, key, parts)):
            fingerprint = cache_key(
                {"documents": tokenizer_key, "fields": fields, "source": fingerprint_sources([source]), "part": index}
            )
            docs, hit = _tokenized(selected, source, fingerprint, tokenizer, fields, key, num_proc)
            hits.append(hit)
            mapped.append(docs)
        per_source.append(mix(mapped, None, "first_exhausted", 0) if mapped else None)
    docs = _mixed_documents(per_source, sources, key, mixing)
    if limit is not None:
        docs = docs.select(range(min(limit, len(docs))))
    fingerprint = cache_key({"blocks": docs._fingerprint, "block_size": block_size, "pack": PACK_DOCUMENTS})
    blocks, hit = map_cached(
        docs,
        fingerprint,
        None,  # one process: batches start where they would in a stream, so both ways give the same blocks
        function=_pack_batch,
        batched=True,
        batch_size=PACK_DOCUMENTS,
        remove_columns=["input_ids"],
        features=token_features("input_ids", "labels", "position_ids"),
        fn_kwargs={"block_size": block_size},
        desc=f"packing {key}",
    )
    hits.append(hit)
    meta = {"documents": len(docs), "tokens": _token_count(docs), "blocks": len(blocks)}
    return Examples(blocks), {**meta, "cache": "hit" if all(hits) else "miss", "cache_path": folder}


def _tokenized(
    selected: Selected,
    source: DataSource,
    fingerprint: str,
    tokenizer: PreTrainedTokenizerBase,
    fields: dict[str, str | None],
    key: str,
    num_proc: int | None,
) -> tuple[Any, bool]:
    """One part's documents, tokenized (blank ones left out)."""
    dataset = selected.dataset
    docs, hit = map_cached(
        dataset,
        fingerprint,
        num_proc,
        function=_document_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=token_features("input_ids"),
        fn_kwargs={
            "part": selected.part,
            "source": source,
            "rows": selected.rows,
            "fields": fields,
            "tokenizer": tokenizer,
            "key": key,
            "filters": [],
        },
        desc=f"tokenizing {key}",
    )
    with quiet_datasets():
        return docs.filter(_has_tokens, input_columns="input_ids", batched=True), hit


def _mixed_documents(
    per_source: list[Any], sources: list[DataSource], key: str, mixing: tuple[MixingStop, int] | None
) -> Any:
    weights = source_weights(sources) if mixing is not None else None
    empty = [i for i, d in enumerate(per_source) if d is None or not _has_rows(d)]
    if len(empty) == len(per_source) or (weights is not None and empty):
        where = key if len(empty) == len(per_source) else f"{key}[{empty[0]}]"
        raise MoraTrainError(f"`{where}`: every document is empty; check the files, filters and task.data.fields.text")
    stop, seed = mixing or ("first_exhausted", 0)
    return mix([d for d in per_source if d is not None and _has_rows(d)], weights, stop, seed)


def _has_rows(dataset: Any) -> bool:
    if hasattr(dataset, "__len__"):
        return len(dataset) > 0
    return True  # a stream: found out when it is read


def stream_blocks(
    spec: Any,
    key: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    fields: dict[str, str | None],
    block_size: int,
    cache_dir: str | None,
    mixing: tuple[MixingStop, int],
) -> TextStream:
    """The text of `spec` as a stream of packed blocks, read again from the start when it ends."""
    sources, problems = resolve_sources(spec, key)
    if problems:
        raise MoraTrainError("; ".join(problems))
    folder = cache_folder(cache_dir)
    per_source: list[Any] = []
    all_parts: list[Part] = []
    for source in sources:
        parts = read_source(source, key, streaming=True, cache_dir=folder)
        all_parts += parts
        filters = id_filters(source)
        documents = [_streamed_documents(part, source, filters, tokenizer, fields, key) for part in parts]
        if not documents:
            per_source.append(None)
            continue
        docs = mix(documents, None, "first_exhausted", 0)
        if source.limit is not None:
            docs = docs.take(source.limit)
        per_source.append(docs.filter(_has_tokens, input_columns="input_ids", batched=True))
    docs = _mixed_documents(per_source, sources, key, mixing)
    blocks = docs.map(_pack_batch, batched=True, batch_size=PACK_DOCUMENTS, fn_kwargs={"block_size": block_size})
    stream = TextStream(blocks, all_parts, key)
    if next(iter(stream), None) is None:  # read for ever, an empty stream would never give a block
        raise MoraTrainError(f"`{key}`: every document is empty; check the files, filters and task.data.fields.text")
    return TextStream(blocks.repeat(None), all_parts, key)


def _streamed_documents(
    part: Part,
    source: DataSource,
    filters: list[tuple[str, str, set[str]]],
    tokenizer: PreTrainedTokenizerBase,
    fields: dict[str, str | None],
    key: str,
) -> Any:
    kwargs = {"part": part, "source": source, "rows": None, "fields": fields, "tokenizer": tokenizer, "key": key}
    docs = part.dataset.map(_document_batch, batched=True, with_indices=True, fn_kwargs={**kwargs, "filters": filters})
    return docs.select_columns(["input_ids"])


class TextStream(torch.utils.data.IterableDataset):
    """Packed blocks read from a datasets IterableDataset as training asks for them, for ever (the Trainer stops at
    trainer.max_steps). A data error met while reading is the project's error, naming the file and line (datasets'
    own error log is silenced while the stream is read).

    `stream[:n]` gives the first n blocks (the export's probe batch); `state_dict()` / `load_state_dict()` are
    datasets' own: the position in the stream, to go on from."""

    def __init__(self, dataset: Any, parts: list[Part], key: str) -> None:
        super().__init__()
        self.dataset = dataset
        self.parts = parts
        self.key = key

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            with quiet_logs():
                yield from self.dataset
        except MoraTrainError:
            raise
        except Exception as err:  # noqa: BLE001 - datasets' builders raise many types while streaming
            raise self._error(err) from None

    def _error(self, err: Exception) -> MoraTrainError:
        for part in self.parts:
            if part.files():
                found = file_error(part.files(), part.locator.fmt, err)
                if "datasets could not read" not in str(found):
                    return found
        return MoraTrainError(f"`{self.key}`: reading the stream failed ({type(err).__name__}: {err})")

    def __getitem__(self, index: slice) -> list[dict[str, Any]]:
        if not isinstance(index, slice) or index.start not in (None, 0) or index.stop is None:
            raise TypeError("a stream gives its first blocks only: stream[:n]")
        blocks = iter(self)
        return [next(blocks) for _ in range(index.stop)]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.dataset.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)

"""Training data prepared inside 🤗 datasets: sources read, filtered, mixed and tokenized by `Dataset.map`.

`tokenize_records` is what a recipe calls with its per-record encoder (record -> token ids and labels): every
source is read by datasets (data/readers.py), its id filters and `limit` select rows, `map` encodes them in
`task.num_proc` processes, and the sources are concatenated or, weighted, interleaved by
`datasets.interleave_datasets`. The result is an Arrow-backed list of {input_ids, labels}.

Cache: datasets keeps the Arrow copy of each source and each `map` result under the task's `cache_dir`, found
again by fingerprint (with `cache_dir: null`, a hub dataset is downloaded to datasets' own cache, as by
`load_records`). A map's fingerprint is ours, made explicit (`new_fingerprint`): the recipe's key (tokenizer,
templates, max_seq_len, ...), the source's files (path, size, modification time) or hub id and revision, and its
filters and limit; change any and the map runs again. `cache_dir: null` uses a temporary folder, removed at exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import glob
import logging
import operator
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_train.core.errors import MoraTrainError
from mora_train.data.cache import cache_key
from mora_train.data.common import LengthReport, fit_to_length, log_length_report, require_examples
from mora_train.data.config import DataRecipe, DataSource, MixingStop, resolve_sources, source_weights
from mora_train.data.readers import Part, loading_errors, quiet_datasets, read_source
from mora_train.data.sources import Record, Where, fingerprint_sources, id_filters, lookup, part_records, record_values

log = logging.getLogger(__name__)

# An encoder: one record -> (input_ids, labels) before the length policy (data/common.py fit_to_length).
Encode = Callable[[Record], tuple[list[int], list[int]]]
KEPT, TRUNCATED, DROPPED = 0, 1, 2  # what the length policy did to an example (column `status`)


def cache_folder(cache_dir: str | None) -> str:
    """Where datasets writes: the task's cache_dir, or (null) a temporary folder of this process, removed at exit."""
    if cache_dir:
        folder = Path(cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    return _temporary_folder()


def hub_cache_folder(cache_dir: str | None) -> str | None:
    """Where a hub dataset is downloaded: the task's cache_dir, or (null) datasets' own cache, kept across runs."""
    return cache_folder(cache_dir) if cache_dir else None


@functools.cache
def _temporary_folder() -> str:
    folder = tempfile.mkdtemp(prefix="mora-train-datasets-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@dataclass
class Selected:
    """One part of a source with the rows its filters and limit keep (None: all), and their source's mapping."""

    part: Part
    rows: list[int] | None
    fields: dict[str, str | None] | None

    @property
    def dataset(self) -> Any:
        return self.part.dataset if self.rows is None else self.part.dataset.select(self.rows)


def select_rows(source: DataSource, key: str, parts: list[Part]) -> list[Selected]:
    """Each part with the rows the source's id filters keep, up to its `limit` (counted over its parts in order)."""
    filters = id_filters(source)
    left = source.limit
    selected = []
    for part in parts:
        rows: list[int] | None = None
        if filters:
            rows = [i for i, record in enumerate(part_records(part)) if _passes(record, filters, key)]
        if left is not None:
            rows = (rows if rows is not None else list(range(len(part.dataset))))[:left]
            left -= len(rows)
        selected.append(Selected(part, rows, source.fields))
    return selected


def _passes(record: Record, filters: list[tuple[str, str, set[str]]], key: str) -> bool:
    for filter_key, field, ids in filters:
        if (str(lookup(record, field, f"{key}.{filter_key}.field")) in ids) != (filter_key == "keep_if_in"):
            return False
    return True


def map_cached(dataset: Any, fingerprint: str, num_proc: int | None, **kwargs: Any) -> tuple[Any, bool]:
    """`dataset.map(**kwargs)` under our fingerprint, and whether its result was in datasets' cache already."""
    hit = False
    if dataset.cache_files:
        prefix = os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), f"cache-{fingerprint}")
        hit = bool(glob.glob(glob.escape(prefix) + "*.arrow"))
    workers = num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None
    return dataset.map(new_fingerprint=fingerprint, num_proc=workers, **kwargs), hit


def mix(datasets_: Sequence[Any], weights: list[float] | None, stop: MixingStop, seed: int) -> Any:
    """Sources in order (concatenated), or interleaved at random in proportion to their weights."""
    import datasets

    if weights is None:
        return datasets_[0] if len(datasets_) == 1 else datasets.concatenate_datasets(list(datasets_))
    total = sum(weights)
    return datasets.interleave_datasets(
        list(datasets_), probabilities=[w / total for w in weights], seed=seed, stopping_strategy=stop
    )


def _encode_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    encode: Encode,
    selected: Selected,
    max_seq_len: int,
    too_long: str,
) -> dict[str, list]:
    """datasets.map's function: a batch of records -> input_ids, labels and status (what the length policy did)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": []}
    columns = list(batch)
    for index, values in zip(indices, zip(*(batch[c] for c in columns), strict=True), strict=True):
        row = selected.rows[index] if selected.rows is not None else index
        record = Record(record_values(dict(zip(columns, values, strict=True))), Where(selected.part.locator, row))
        record.fields = selected.fields
        report = LengthReport()
        example = fit_to_length(*encode(record), max_seq_len, too_long, report)
        status = DROPPED if example is None else TRUNCATED if report.truncated else KEPT
        out["input_ids"].append(example["input_ids"] if example else [])
        out["labels"].append(example["labels"] if example else [])
        out["status"].append(status)
    return out


def token_features(*columns: str, status: bool = False) -> Any:
    """int32 token columns (half of datasets' default int64 on disk; ids and -100 fit), and an int8 status."""
    import datasets

    features = {name: datasets.List(datasets.Value("int32")) for name in columns}
    return datasets.Features({**features, **({"status": datasets.Value("int8")} if status else {})})


def _is_kept(status: list[int]) -> list[bool]:
    return [s != DROPPED for s in status]


class Examples(Sequence[dict[str, Any]]):
    """Tokenized examples in datasets' Arrow files, read as a list of {input_ids, labels} dicts (what the trainer,
    the export's probe batch and the metrics read); `dataset` is the datasets.Dataset itself."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.dataset[i] for i in range(*index.indices(len(self)))]
        return self.dataset[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]


def training_set(
    recipe: DataRecipe, encode: Encode, key_parts: dict[str, Any], max_seq_len: int
) -> tuple[Examples, dict[str, Any]]:
    """A recipe's training examples (task.data.train through tokenize_records with the recipe's cache, processes,
    too_long and mixing), their length report logged; MoraTrainError when none is left."""
    examples, meta = tokenize_records(
        recipe.data.train,
        "task.data.train",
        encode,
        key_parts=key_parts,
        cache_dir=recipe.cache_dir,
        num_proc=recipe.num_proc,
        max_seq_len=max_seq_len,
        too_long=recipe.too_long,
        mixing=(recipe.data.mixing_stop, recipe.data.mixing_seed),
    )
    report = LengthReport(meta["examples_read"], meta["truncated"], meta["dropped"])
    log_length_report(f"{recipe.name} training set", report, max_seq_len)
    require_examples(examples, "task.data.train", report, max_seq_len, recipe.too_long)
    return examples, meta


def tokenize_records(
    spec: Any,
    key: str,
    encode: Encode,
    *,
    key_parts: dict[str, Any],
    cache_dir: str | None,
    num_proc: int | None,
    max_seq_len: int,
    too_long: str,
    mixing: tuple[MixingStop, int] = ("first_exhausted", 0),
) -> tuple[Examples, dict[str, Any]]:
    """The examples of a source spec, each record encoded then fitted to max_seq_len (`too_long`: truncate or drop),
    and what happened: examples_read, truncated, dropped, cache (hit: every map was in the cache) and cache_path."""
    sources, problems = resolve_sources(spec, key)
    if problems:
        raise MoraTrainError("; ".join(problems))
    folder = cache_folder(cache_dir)
    parts = {**key_parts, "max_seq_len": max_seq_len, "too_long": too_long}
    job = _Job(key, encode, parts, num_proc, folder, hub_cache_folder(cache_dir))
    per_source = [job.source(number, source, max_seq_len, too_long) for number, source in enumerate(sources)]
    weights = source_weights(sources)
    empty = [i for i, d in enumerate(per_source) if d is None or not len(d)]
    if len(empty) == len(sources) or (weights is not None and empty):
        where = key if len(empty) == len(sources) else f"{key}[{empty[0]}]"
        raise MoraTrainError(
            f"`{where}` gave no records (after filters); check the files/split and any keep_if_in/drop_if_in/limit"
        )
    mixed = mix([d for d in per_source if d is not None and len(d)], weights, *mixing)
    counts = _status_counts(mixed)
    with quiet_datasets():
        kept = mixed.filter(_is_kept, input_columns="status", batched=True).remove_columns("status")
    meta = {
        "examples_read": sum(counts.values()),
        "truncated": counts.get(TRUNCATED, 0),
        "dropped": counts.get(DROPPED, 0),
        "cache": "hit" if job.hits and all(job.hits) else "miss",
        "cache_path": folder,
    }
    return Examples(kept), meta


@dataclass
class _Job:
    key: str
    encode: Encode
    key_parts: dict[str, Any]
    num_proc: int | None
    folder: str
    hub_folder: str | None
    hits: list[bool] = dataclasses.field(default_factory=list)

    def source(self, number: int, source: DataSource, max_seq_len: int, too_long: str) -> Any:
        """One source's examples (every part encoded), with the status column."""
        import datasets

        mapped = []
        parts = read_source(source, self.key, streaming=False, cache_dir=self.folder, hub_cache_dir=self.hub_folder)
        for index, selected in enumerate(select_rows(source, self.key, parts)):
            where = {"source": fingerprint_sources([source]), "number": number, "part": index}
            dataset = selected.dataset
            with loading_errors(selected.part.files(), selected.part.locator.fmt):
                result, hit = map_cached(
                    dataset,
                    cache_key({**self.key_parts, **where}),
                    self.num_proc,
                    function=_encode_batch,
                    batched=True,
                    with_indices=True,
                    remove_columns=dataset.column_names,
                    features=token_features("input_ids", "labels", status=True),
                    fn_kwargs={
                        "encode": self.encode,
                        "selected": selected,
                        "max_seq_len": max_seq_len,
                        "too_long": too_long,
                    },
                    desc=f"tokenizing {self.key}",
                )
            self.hits.append(hit)
            mapped.append(result)
        if not mapped:
            return None
        return datasets.concatenate_datasets(mapped) if len(mapped) > 1 else mapped[0]


def _status_counts(dataset: Any) -> dict[int, int]:
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["status"]
    return {int(v["values"]): int(v["counts"]) for v in pc.value_counts(column).to_pylist()}

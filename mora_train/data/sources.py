"""A task's records: every source read through 🤗 datasets (data/readers.py), then field mapping.

A source (`DataSource`, data/config.py, which documents its keys) is local files (.jsonl/.ndjson, .json, .csv,
.tsv, .parquet, .arrow, .txt with field `text`) or a Hub dataset; a bare string is short for `{path: STRING}`; a
list of sources is read in order and concatenated, or mixed at random by their weights (`interleave_datasets`).

`load_records` gives the records as Python objects, for data that is used whole (evaluation sets, benchmarks);
data/prepare.py tokenizes training data inside datasets instead (num_proc processes, fingerprint cache), and
data/pretrain.py streams it.

Field mapping: each recipe field (e.g. `question`) maps to a field of your records, written as a
dotted path (`instances.0.input`, `options.A`) or as a template of several fields
(`"{title}\\n{abstract}"`; list values are joined with newlines). Every data error names the file
and line (or hub row) and what to change, and raises MoraTrainError: no traceback reaches the user.
"""

from __future__ import annotations

import contextlib
import json
import string
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mora_train.core.errors import MoraTrainError
from mora_train.data.config import DataSource, MixingStop, resolve_sources, source_weights
from mora_train.data.locate import Locator, read_text
from mora_train.data.readers import Part, read_source


class Where:
    """A record's place, found when an error asks for it: its number in its part, and the part's locator."""

    __slots__ = ("locator", "row")

    def __init__(self, locator: Locator, row: int) -> None:
        self.locator, self.row = locator, row

    def __str__(self) -> str:
        return self.locator.where(self.row)


class Record:
    """One record as read (`values`), where it comes from, and its source's own field mapping."""

    __slots__ = ("_where", "fields", "values")

    def __init__(self, values: dict[str, Any], where: str | Where, fields: dict[str, str | None] | None = None):
        self.values = values
        self._where = where  # "FILE line N" or "hub dataset ID [split] row N": every error about the record names it
        self.fields = fields  # its source's own field mapping, over the task's data.fields

    @property
    def where(self) -> str:
        if not isinstance(self._where, str):
            self._where = str(self._where)
        return self._where


def record_values(row: dict[str, Any]) -> dict[str, Any]:
    """A row as datasets gives it, without the nulls it fills in for fields a record does not have (datasets gives
    every record every field of the file)."""
    return {k: v for k, v in row.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def temporary_cache() -> Iterator[str]:
    """A cache folder for datasets' Arrow copy of data read whole into Python objects, removed after."""
    with tempfile.TemporaryDirectory(prefix="mora-train-datasets-") as folder:
        yield folder


def load_records(
    spec: Any, key: str, *, mixing_stop: MixingStop = "first_exhausted", mixing_seed: int = 0
) -> list[Record]:
    """All records of a source spec (`task.data.train` and the like: a DataSource, a path, a plain mapping, or a
    list of them), in order (weighted sources: mixed). Raises MoraTrainError on any data problem or an empty
    result."""
    sources, problems = resolve_sources(spec, key)
    if problems:
        raise MoraTrainError("; ".join(problems))
    with temporary_cache() as cache_dir:
        per_source = [_source_records(source, key, cache_dir) for source in sources]
    weights = source_weights(sources)
    if weights is None:
        records = [r for records in per_source for r in records]
    else:
        order = mixed_order([len(records) for records in per_source], weights, mixing_stop, mixing_seed)
        records = [per_source[s][r] for s, r in order]
    if not records:
        raise MoraTrainError(
            f"`{key}` gave no records (after filters); check the files/split and any keep_if_in/drop_if_in/limit"
        )
    return records


def mixed_order(sizes: Sequence[int], weights: Sequence[float], stop: MixingStop, seed: int) -> list[tuple[int, int]]:
    """(source, record) of each record of a weighted mix, as `datasets.interleave_datasets` draws it."""
    import datasets

    total = sum(weights)
    parts = [datasets.Dataset.from_dict({"s": [i] * n, "r": list(range(n))}) for i, n in enumerate(sizes)]
    mixed = datasets.interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=stop
    )
    return list(zip(mixed["s"], mixed["r"], strict=True))


def part_records(part: Part, stop_after: int | None = None) -> Iterator[Record]:
    """The records of one part, each with its place."""
    rows = 0
    for batch in part.dataset.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield Record(record_values(dict(zip(columns, values, strict=True))), Where(part.locator, rows))
            rows += 1
            if stop_after is not None and rows >= stop_after:
                return


def _source_records(source: DataSource, key: str, cache_dir: str) -> list[Record]:
    limit = source.limit
    records: list[Record] = []
    for part in read_source(source, key, streaming=False, cache_dir=cache_dir):
        wanted = None if limit is None or source.filters() else limit - len(records)
        records.extend(part_records(part, wanted))
        if wanted is not None and len(records) >= limit:  # type: ignore[operator]
            break
    for filter_key, field, ids in id_filters(source):
        keep = filter_key == "keep_if_in"
        records = [r for r in records if (str(lookup(r, field, f"{key}.{filter_key}.field")) in ids) == keep]
    if limit is not None:
        records = records[:limit]
    if source.fields is not None:
        for r in records:
            r.fields = source.fields
    return records


def id_filters(source: DataSource) -> list[tuple[str, str, set[str]]]:
    """(keep_if_in | drop_if_in, the record field, the ids of its file) of each filter of the source."""
    return [(key, spec.field, _id_set(Path(spec.file).expanduser())) for key, spec in source.filters()]


def _id_set(path: Path) -> set[str]:
    """Ids in a filter file: a JSON object's keys, a JSON array's items, or a text file's lines."""
    try:
        text = read_text(path)
    except ValueError as err:
        raise MoraTrainError(str(err)) from None
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise MoraTrainError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        return {str(v) for v in (value.keys() if isinstance(value, dict) else value)}
    return {line.strip() for line in text.split("\n") if line.strip()}


# ----------------------------------------------------------------------------------------------
# Field access


_MISSING = object()


def _get(values: Any, path: str) -> Any:
    """Value at a dotted path (`instances.0.input`); keys that themselves contain dots are tried whole first."""
    if isinstance(values, dict) and path in values:
        return values[path]
    head, _, rest = path.partition(".")
    if isinstance(values, dict) and head in values:
        current = values[head]
    elif isinstance(values, list) and head.lstrip("-").isdigit() and -len(values) <= int(head) < len(values):
        current = values[int(head)]
    else:
        return _MISSING
    return _get(current, rest) if rest else current


def present_fields(record: Record) -> str:
    return ", ".join(record.values) if record.values else "(none)"


def lookup(record: Record, path: str, key: str) -> Any:
    """The value at `path` in the record; a missing (or null) field raises an error naming it and the fields present."""
    value = _get(record.values, path)
    if value is _MISSING or value is None:
        what = "is missing" if value is _MISSING else "is null"
        raise MoraTrainError(
            f"{record.where}: field '{path}' {what} (wanted by `{key}`); the record has fields: "
            f"{present_fields(record)}. Point `{key}` at the field that holds it."
        )
    return value


def as_text(value: Any) -> str:
    """Text of a field value: strings as they are, lists joined by newlines, numbers via str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(as_text(v) for v in value)
    return str(value)


def render(template: str, record: Record, key: str) -> str:
    """Fill `{field}` / `{a.b.0}` placeholders from the record (lists joined by newlines); `{{`/`}}` are literal
    braces."""
    parts = []
    for literal, name, spec, _ in _parse_template(template, key):
        parts.append(literal)
        if name is not None:
            if name == "":
                raise MoraTrainError(
                    f"`{key}={template!r}` has an empty {{}} placeholder; name a field inside the braces"
                )
            value = as_text(lookup(record, name, key))
            try:
                parts.append(format(value, spec) if spec else value)
            except (ValueError, TypeError) as err:
                raise MoraTrainError(
                    f"`{key}={template!r}`: format spec {spec!r} does not apply to {record.where}'s "
                    f"{name} ({err}); drop the `:{spec}`"
                ) from None
    return "".join(parts)


def _parse_template(template: str, key: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """string.Formatter's parse, with a malformed template ("{", "}", "{a") as the project's error."""
    try:
        return list(string.Formatter().parse(template))
    except ValueError as err:
        raise MoraTrainError(
            f"`{key}={template!r}` is not a valid template ({err}); write fields as {{name}} and literal braces "
            "as {{ and }}"
        ) from None


def is_template(spec: str) -> bool:
    return "{" in spec


def field_value(record: Record, spec: str, key: str) -> Any:
    """A recipe field's value: a template renders to text; a path returns the raw value (lists stay lists)."""
    return render(spec, record, key) if is_template(spec) else lookup(record, spec, key)


def map_fields(
    record: Record,
    fields: dict[str, str | None],
    fields_key: str,
    required: Iterable[str],
    optional: Iterable[str] = (),
) -> dict[str, Any]:
    """{recipe field: value} for one record, using its source's own mapping when it has one."""
    mapping = {**fields, **(record.fields or {})}
    out: dict[str, Any] = {}
    for name in required:
        spec = mapping.get(name)
        if spec is None:
            raise MoraTrainError(f"`{fields_key}.{name}` is not set; map it to the field of your data that holds it")
        out[name] = field_value(record, spec, f"{fields_key}.{name}")
    for name in optional:
        spec = mapping.get(name)
        if spec is None:
            continue
        value = render(spec, record, f"{fields_key}.{name}") if is_template(spec) else _get(record.values, spec)
        if value is not _MISSING and value is not None:
            out[name] = value
    return out


def has_field(record: Record, fields: dict[str, str | None], name: str) -> bool:
    spec = {**fields, **(record.fields or {})}.get(name)
    if spec is None:
        return False
    if is_template(spec):
        names = [name for _, name, _, _ in _parse_template(spec, f"task.data.fields.{name}") if name is not None]
        return all(_get(record.values, f) not in (_MISSING, None) for f in names)
    return _get(record.values, spec) not in (_MISSING, None)


def fingerprint_sources(spec: Any) -> list[Any]:
    """What identifies a source's content for the tokenized-data cache: files by path, size and mtime; hub by id."""
    out: list[Any] = []
    for source in resolve_sources(spec, "")[0]:
        if source.hub is not None:
            out.append(
                {"hub": source.hub, "hub_config": source.hub_config, "split": source.split, "revision": source.revision}
            )
        else:
            out.append([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in source.files()])
        for filter_key, id_filter in source.filters():
            f = Path(id_filter.file).expanduser()
            out.append((filter_key, id_filter.field, str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns))
        out.append(
            {"fields": source.fields, "limit": source.limit, "text_unit": source.text_unit, "weight": source.weight}
        )
    return out

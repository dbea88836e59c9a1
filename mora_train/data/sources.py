"""Where a task's records come from: local files or a Hugging Face Hub dataset, plus field mapping.

A source (`DataSource`, data/config.py, which documents its keys) is local files (.jsonl/.ndjson, .json, .csv,
.tsv, .parquet, .txt with field `text`) or a Hub dataset; a bare string is short for `{path: STRING}`; a list
of sources is read in order and concatenated.

Field mapping: each recipe field (e.g. `question`) maps to a field of your records, written as a
dotted path (`instances.0.input`, `options.A`) or as a template of several fields
(`"{title}\\n{abstract}"`; list values are joined with newlines). Every data error names the file
and line (or hub row) and what to change, and raises MoraTrainError: no traceback reaches the user.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_train.core.errors import MoraTrainError
from mora_train.data.config import DataSource, resolve_sources
from mora_train.data.paths import LOCAL_FORMATS


@dataclass
class Record:
    values: dict[str, Any]  # the record as read
    where: str  # "FILE line N" or "hub dataset ID (split) row N": every error about the record names it
    fields: dict[str, str | None] | None = None  # its source's own field mapping, over the task's data.fields


# ----------------------------------------------------------------------------------------------
# Reading


def load_records(spec: Any, key: str) -> list[Record]:
    """All records of a source spec (`task.data.train` and the like: a DataSource, a path, a plain mapping, or a
    list of them), in order. Raises MoraTrainError on any data problem or an empty result."""
    sources, problems = resolve_sources(spec, key)
    if problems:
        raise MoraTrainError("; ".join(problems))
    records: list[Record] = []
    for source in sources:
        records.extend(_read_source(source, key))
    if not records:
        raise MoraTrainError(
            f"`{key}` gave no records (after filters); check the files/split and any keep_if_in/drop_if_in/limit"
        )
    return records


def _read_source(source: DataSource, key: str) -> list[Record]:
    limit = source.limit
    if source.hub is not None:
        records = _read_hub(source, key)
    else:
        records = []
        for file in source.files():
            records.extend(read_file(file, source.text_unit))
            if limit is not None and len(records) >= limit and not source.filters():
                break
    for filter_key, spec in source.filters():
        keep = filter_key == "keep_if_in"
        ids = _id_set(Path(spec.file).expanduser())
        records = [r for r in records if (_id_value(r, spec.field, f"{key}.{filter_key}.field") in ids) == keep]
    if limit is not None:
        records = records[:limit]
    if source.fields is not None:
        for r in records:
            r.fields = source.fields
    return records


def _read_hub(source: DataSource, key: str) -> list[Record]:
    hub, config, split, revision = source.hub, source.hub_config, source.split or "", source.revision
    if source.limit is not None and "[" not in split:
        split = f"{split}[:{source.limit}]"  # datasets slices the split: only the first `limit` rows are materialised
    try:
        import datasets

        dataset = datasets.load_dataset(hub, config, split=split, revision=revision)
    except Exception as err:  # noqa: BLE001 - datasets raises many types (network, missing config/split, gated)
        first_line = str(err).splitlines()[0] if str(err) else "no details"
        raise MoraTrainError(
            f"could not load hub dataset '{hub}' (config {config!r}, split {split!r}): {type(err).__name__}: "
            f"{first_line}. Offline or gated? Download it where you have access (`hf download {hub} --repo-type "
            f"dataset --local-dir DIR`), copy DIR here and read the files instead: `{key}.hub=null {key}.path=DIR`."
        ) from None
    where = f"hub dataset {hub}" + (f" ({config})" if config else "") + f" [{split}] row"
    return [Record(dict(row), f"{where} {i}") for i, row in enumerate(dataset)]


def read_file(path: Path, text_unit: str = "file") -> list[Record]:
    """Records of one local file, by extension. Errors name the file and line."""
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MoraTrainError(
            f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv, .tsv, .parquet or .txt"
        )
    if fmt == "parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    if fmt == "json":
        return _read_json(path, text)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, text, "\t" if fmt == "tsv" else ",")
    return _read_txt(path, text, text_unit)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise MoraTrainError(
            f"{path} line {line}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    # Split on "\n" only: str.splitlines() also splits on U+2028/U+2029/\x1c..., which are legal
    # inside JSON strings (PubMedQA has U+2029 in an abstract).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoraTrainError(
                f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
            ) from None
        if not isinstance(value, dict):
            raise MoraTrainError(f"{path} line {number}: expected a JSON object per line, got {type(value).__name__}")
        records.append(Record(value, f"{path} line {number}"))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise MoraTrainError(f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        # An object keyed by id (e.g. PubMedQA's ori_pqal.json): one record per entry, the key as `id`.
        return [Record({"id": k, **v}, f"{path} entry {k!r}") for k, v in value.items()]
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]}-style wrappers
            value = value[lists[0]]
    if not isinstance(value, list):
        raise MoraTrainError(f"{path}: expected a JSON array of objects (or JSON Lines in a .jsonl file)")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise MoraTrainError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
    return [Record(item, f"{path} item {i}") for i, item in enumerate(value)]


def _read_csv(path: Path, text: str, delimiter: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise MoraTrainError(
                    f"{path} line {reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}); check quoting and delimiters on that line"
                )
            records.append(Record(dict(zip(header, row, strict=True)), f"{path} line {reader.line_num}"))
    except csv.Error as err:
        raise MoraTrainError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for damaged files
        raise MoraTrainError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    return [Record(row, f"{path} row {i}") for i, row in enumerate(rows)]


def _read_txt(path: Path, text: str, unit: str) -> list[Record]:
    if unit == "file":
        return [Record({"text": text}, str(path))] if text.strip() else []
    if unit == "line":
        return [
            Record({"text": line.rstrip("\r")}, f"{path} line {n}")
            for n, line in enumerate(text.split("\n"), 1)
            if line.strip()
        ]
    records: list[Record] = []
    block: list[str] = []
    start = 1
    for n, raw in enumerate([*text.split("\n"), ""], 1):
        line = raw.rstrip("\r")
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            records.append(Record({"text": "\n".join(block)}, f"{path} line {start}"))
            block = []
    return records


def _id_set(path: Path) -> set[str]:
    """Ids in a filter file: a JSON object's keys, a JSON array's items, or a text file's lines."""
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise MoraTrainError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        return {str(v) for v in (value.keys() if isinstance(value, dict) else value)}
    return {line.strip() for line in text.split("\n") if line.strip()}


def _id_value(record: Record, field: str, key: str) -> str:
    value = lookup(record, field, key)
    return str(value)


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
        out.append({"fields": source.fields, "limit": source.limit, "text_unit": source.text_unit})
    return out

"""Where a record comes from, and what is wrong with a file that datasets could not read.

Local files are read by `datasets.load_dataset` (data/readers.py), which numbers records, not lines. Every error
about a record still names its file and line ("train.jsonl line 7"): a `Locator` turns a record's number in its
source into that place, reading the files again only when an error needs it. When datasets cannot read a file at
all, `file_problem` scans it as the hand-written readers did (UTF-8, JSON per line, CSV field counts, ...) to say
which line is wrong and how to fix it.

The record numbering here is the one data/readers.py produces: JSON Lines and .txt lines skip blank lines, .txt
paragraphs are runs of non-blank lines, a .txt file is one record unless blank, CSV rows skip empty lines.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path


def read_text(path: Path, universal_newlines: bool = False) -> str:
    """A file's text (UTF-8, a BOM dropped); `universal_newlines`: line ends as Python's text mode reads them
    (\\r\\n and \\r become \\n), as datasets reads .txt files.

    Raises ValueError with the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text


def paragraphs(text: str, first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(start line, paragraph) of each run of non-blank lines of `text`."""
    block: list[str] = []
    start = first_line
    for n, line in enumerate([*text.split("\n"), ""], first_line):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield start, "\n".join(block)
            block = []


def json_shape(path: Path, value: object) -> tuple[str | None, str | None]:
    """How a parsed .json file holds its records: ("array"|"keyed"|"field name", None), or (None, the problem)."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return "keyed", None  # an object keyed by id (PubMedQA's ori_pqal.json): one record per entry
    items = value
    shape = "array"
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]}-style wrappers
            shape, items = lists[0], value[lists[0]]
    if not isinstance(items, list):
        return None, f"{path}: expected a JSON array of objects (or JSON Lines in a .jsonl file)"
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return None, f"{path} item {i}: expected a JSON object, got {type(item).__name__}"
    return shape, None


def parse_json(path: Path) -> tuple[object, str | None]:
    """A .json file's value, or the problem (naming the line) that stops it from being one."""
    try:
        text = read_text(path)
    except ValueError as err:
        return None, str(err)
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"


def file_problem(path: Path, fmt: str) -> str | None:
    """The first thing wrong with a data file, as one sentence naming the line and the fix; None when the scan finds
    nothing (the caller then reports what datasets said)."""
    if fmt in ("parquet", "arrow"):
        return _binary_problem(path, fmt)
    if fmt == "json":
        value, problem = parse_json(path)
        return problem or json_shape(path, value)[1]
    try:
        text = read_text(path)
    except ValueError as err:
        return str(err)
    if fmt == "jsonl":
        return _jsonl_problem(path, text)
    if fmt in ("csv", "tsv"):
        return csv_problem(path, text, "\t" if fmt == "tsv" else ",")
    return None


def _jsonl_problem(path: Path, text: str) -> str | None:
    # Split on "\n" only: str.splitlines() also splits on U+2028/U+2029/\x1c..., which are legal
    # inside JSON strings (PubMedQA has U+2029 in an abstract).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
        if not isinstance(value, dict):
            return f"{path} line {number}: expected a JSON object per line, got {type(value).__name__}"
    return None


def csv_problem(path: Path, text: str, delimiter: str) -> str | None:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        for row in reader:
            if row and header is not None and len(row) != len(header):
                return (
                    f"{path} line {reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                    f"({', '.join(header)}); check quoting and delimiters on that line"
                )
    except csv.Error as err:
        return f"{path} line {reader.line_num}: malformed CSV ({err})"
    return None


def csv_header(path: Path, delimiter: str) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def _binary_problem(path: Path, fmt: str) -> str | None:
    try:
        _row_count(path, fmt)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for damaged files
        return f"{path}: not a readable {fmt} file ({type(err).__name__}: {err})"
    return None


class Locator:
    """Turns a record's number in a source (one datasets load: files of one format, or a hub split) into the place
    errors name: "FILE line N", "FILE item N", "FILE row N", or "hub dataset ID [SPLIT] row N"."""

    def __init__(self, files: Sequence[Path] = (), fmt: str = "", text_unit: str = "file", hub: str | None = None):
        self.files = list(files)
        self.fmt = fmt
        self.text_unit = text_unit
        self.hub = hub  # "hub dataset ID (CONFIG) [SPLIT]" for a hub source
        self._counts: dict[Path, int] = {}

    def where(self, row: int) -> str:
        if self.hub is not None:
            return f"{self.hub} row {row}"
        left = row
        for file in self.files:
            count = self._counts.get(file)
            if count is None:
                count = self._counts[file] = sum(1 for _ in self._labels(file))
            if left < count:
                return next(itertools.islice(self._labels(file), left, None))
            left -= count
        return f"{', '.join(map(str, self.files))} record {row}"

    def _labels(self, path: Path) -> Iterator[str]:
        """The place of each record of one file, in order."""
        if self.fmt in ("parquet", "arrow"):
            yield from (f"{path} row {i}" for i in range(_row_count(path, self.fmt)))
        elif self.fmt == "json":
            value, _ = parse_json(path)
            shape, _ = json_shape(path, value)
            if shape == "keyed" and isinstance(value, dict):
                yield from (f"{path} entry {k!r}" for k in value)
            else:
                items = value if shape == "array" else value[shape] if isinstance(value, dict) and shape else []
                yield from (f"{path} item {i}" for i in range(len(items) if isinstance(items, list) else 0))
        elif self.fmt in ("csv", "tsv"):
            reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t" if self.fmt == "tsv" else ",")
            next(reader, None)
            yield from (f"{path} line {reader.line_num}" for row in reader if row)
        elif self.fmt == "txt" and self.text_unit == "file":
            yield from ([str(path)] if read_text(path).strip() else [])
        elif self.fmt == "txt" and self.text_unit == "paragraph":
            yield from (f"{path} line {start}" for start, _ in paragraphs(read_text(path, universal_newlines=True)))
        else:  # JSON Lines, .txt lines: non-blank lines
            lines = read_text(path, universal_newlines=self.fmt == "txt").split("\n")
            yield from (f"{path} line {n}" for n, line in enumerate(lines, 1) if line.strip())


def _row_count(path: Path, fmt: str) -> int:
    """Rows of a parquet file, or of an Arrow IPC file (stream format, as datasets writes, or file format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return int(pq.read_metadata(path).num_rows)
    with pa.memory_map(str(path)) as source:
        try:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        except (OSError, pa.ArrowInvalid):
            source.seek(0)
            return int(pa.ipc.open_file(source).read_all().num_rows)

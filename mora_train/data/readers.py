"""Reading one source with 🤗 datasets: local files of every common format, or a Hub dataset at a revision.

`read_source` gives a source's records as `Part`s: one `datasets.load_dataset` call each (a run of files of one
format, or a hub split), as a `Dataset` (Arrow files in the cache folder) or, streaming, an `IterableDataset` that
holds one batch at a time. Each part has a `Locator` that names a record's file and line for error messages.

Formats, by extension: .jsonl/.ndjson and .json (datasets' json builder; a .json file may be an array of objects,
a `{"data": [...]}` wrapper, or an object keyed by id, whose key becomes field `id`), .csv/.tsv (every field a
string, as written), .parquet, .arrow, .txt (field `text`; one record per file, line or paragraph). What the
readers refused before datasets read the files is refused still, with the line: a CSV row with the wrong number of
fields, a .json file that is not a list of objects; a file datasets cannot read is scanned for the line at fault.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_train.config.quiet import logger_level
from mora_train.core.errors import MoraTrainError
from mora_train.data.config import DataSource
from mora_train.data.locate import Locator, csv_header, csv_problem, file_problem, json_shape, paragraphs, parse_json
from mora_train.data.locate import read_text as read_file_text
from mora_train.data.paths import LOCAL_FORMATS

BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet", "arrow": "arrow"}
TEXT_UNITS = {"file": "document", "line": "line", "paragraph": "paragraph"}  # text_unit -> datasets' sample_by
_SMALL = 1 << 20  # files below this size are checked for being blank before datasets reads them


@dataclass
class Part:
    dataset: Any  # datasets.Dataset or datasets.IterableDataset: the records as read
    locator: Locator  # a record's number in `dataset` -> the place errors name

    def files(self) -> list[Path]:
        return self.locator.files


def read_source(
    source: DataSource, key: str, *, streaming: bool, cache_dir: str, hub_cache_dir: str | None = None
) -> list[Part]:
    """The records of one source, as datasets reads them (hub, or local files grouped by format). Local files'
    Arrow copies go to `cache_dir`; a hub dataset's download to `hub_cache_dir` (None: datasets' own cache,
    ~/.cache/huggingface or $HF_DATASETS_CACHE, kept across runs and shared with other tools)."""
    if source.hub is not None:
        return [_hub_part(source, key, streaming, hub_cache_dir)]
    parts = []
    for (fmt, detail), group in itertools.groupby(_described(source.files()), key=lambda f: (f[1], f[2])):
        files = [path for path, _, _ in group]
        parts.append(_local_part(files, fmt, detail, source.text_unit, streaming, cache_dir))
    return parts


def _described(files: list[Path]) -> Iterator[tuple[Path, str, Any]]:
    """(file, format, what else groups it: a CSV header, a .json shape) of every file with records, in order.

    Files whose whole content is blank give no record and are left out (datasets refuses a split with no data).
    CSV and .json files are checked here, so their errors keep the readers' line numbers."""
    for path in files:
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise MoraTrainError(
                f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv, .tsv, .parquet, .arrow or "
                ".txt"
            )
        if fmt not in ("parquet", "arrow") and path.stat().st_size < _SMALL and not path.read_bytes().strip():
            continue
        detail: Any = None
        if fmt in ("csv", "tsv"):
            delimiter = "\t" if fmt == "tsv" else ","
            problem = csv_problem(path, _text(path), delimiter)
            if problem:
                raise MoraTrainError(problem)
            detail = tuple(csv_header(path, delimiter))
        elif fmt == "json":
            value, problem = parse_json(path)
            shape, problem = (None, problem) if problem else json_shape(path, value)
            if problem:
                raise MoraTrainError(problem)
            detail = (shape, str(path)) if shape == "keyed" else shape  # keyed files are read one by one
        yield path, fmt, detail


def _text(path: Path) -> str:
    try:
        return read_file_text(path)
    except ValueError as err:
        raise MoraTrainError(str(err)) from None


def _local_part(files: list[Path], fmt: str, detail: Any, unit: str, streaming: bool, cache_dir: str) -> Part:
    import datasets

    locator = Locator(files, fmt, unit)
    if fmt == "json" and isinstance(detail, tuple):  # an object keyed by id: datasets has no builder for it
        value, _ = parse_json(files[0])
        assert isinstance(value, dict)
        dataset = _from_rows([{"id": k, **v} for k, v in value.items()], files[0])
        return Part(dataset.to_iterable_dataset() if streaming else dataset, locator)
    kwargs: dict[str, Any] = {}
    if fmt in ("jsonl", "json"):
        kwargs["parse_agent_traces"] = False  # records with `type` and `message` fields are records, not traces
        if fmt == "json" and detail != "array":
            kwargs["field"] = detail
    elif fmt in ("csv", "tsv"):
        # Every field a string, as the file has it ("007" stays "007", "NA" and "" stay text).
        kwargs.update(sep="\t" if fmt == "tsv" else ",", keep_default_na=False, na_filter=False)
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in detail})
    elif fmt == "txt":
        kwargs.update(sample_by=TEXT_UNITS[unit], encoding="utf-8-sig")
    builder = BUILDERS.get(fmt, "text")
    with quiet_datasets(), loading_errors(files, fmt):
        dataset = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            streaming=streaming,
            cache_dir=cache_dir,
            **kwargs,
        )
        if fmt == "txt":
            dataset = _text_records(dataset, unit)
    return Part(dataset, locator)


def _from_rows(rows: list[dict], path: Path) -> Any:
    import datasets

    try:
        return datasets.Dataset.from_list(rows)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/TypeError on mixed types
        raise MoraTrainError(
            f"{path}: its entries do not hold one type per field ({type(err).__name__}: {_first_line(err)}); "
            "give each field the same type in every entry"
        ) from None


def _text_records(dataset: Any, unit: str) -> Any:
    """.txt records as data/locate.py numbers them: blank lines, files and paragraphs give none, and a paragraph is
    a run of non-blank lines (datasets splits on "\\n\\n" only)."""
    if unit != "paragraph":
        return dataset.filter(_not_blank, input_columns="text")
    return dataset.map(_split_paragraphs, batched=True, input_columns="text")


def _not_blank(text: str) -> bool:
    return bool(text.strip())


def _split_paragraphs(texts: list[str]) -> dict[str, list[str]]:
    return {"text": [p for text in texts for _, p in paragraphs(text)]}


_SLICE = re.compile(r"^(?P<name>[\w.-]+)\[:(?P<stop>\d+)\]$")


def _hub_part(source: DataSource, key: str, streaming: bool, cache_dir: str | None) -> Part:
    """A hub split (sliced to `limit` when no filter needs the records after it); streamed, a slice `NAME[:N]` is
    read as the first N records."""
    hub, config, split, revision = source.hub, source.hub_config, source.split or "", source.revision
    if source.limit is not None and "[" not in split:
        split = f"{split}[:{source.limit}]"  # datasets slices the split: only the first `limit` rows are materialised
    take = None
    if streaming and "[" in split:
        match = _SLICE.match(split.replace(" ", ""))
        if match is None:
            raise MoraTrainError(
                f"`{key}.split={split}`: a streamed hub split can only be cut to its first N records "
                f"({split.split('[')[0]}[:N]); use {key}.limit=N, or task.data.streaming=false for other slices"
            )
        split, take = match["name"], int(match["stop"])
    extra = {"cache_dir": cache_dir} if cache_dir is not None and not streaming else {}
    try:
        import datasets

        with quiet_datasets():
            dataset = datasets.load_dataset(hub, config, split=split, revision=revision, streaming=streaming, **extra)
    except Exception as err:  # noqa: BLE001 - datasets raises many types (network, missing config/split, gated)
        raise MoraTrainError(
            f"could not load hub dataset '{hub}' (config {config!r}, split {split!r}): {type(err).__name__}: "
            f"{_first_line(err)}. Offline or gated? Download it where you have access (`hf download {hub} --repo-type "
            f"dataset --local-dir DIR`), copy DIR here and read the files instead: `{key}.hub=null {key}.path=DIR`."
        ) from None
    if take is not None:
        dataset = dataset.take(take)
    label = f"hub dataset {hub}" + (f" ({config})" if config else "") + f" [{source.split or split}]"
    return Part(dataset, Locator(hub=label))


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else "no details"


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def file_error(files: list[Path], fmt: str, err: BaseException) -> MoraTrainError:
    """The error for files datasets could not read: the first problem a scan of them finds, or what datasets said."""
    for path in files:
        problem = file_problem(path, fmt)
        if problem:
            return MoraTrainError(problem)
    cause = _innermost(err)
    names = ", ".join(map(str, files[:3])) + (f" (and {len(files) - 3} more)" if len(files) > 3 else "")
    return MoraTrainError(
        f"{names}: datasets could not read this {fmt} data ({type(cause).__name__}: {_first_line(cause)}); check "
        f"that it is valid {fmt} (one type per field in every record) or convert it to .jsonl or .parquet"
    )


@contextlib.contextmanager
def loading_errors(files: list[Path], fmt: str) -> Iterator[None]:
    """Any error of datasets reading `files` becomes the project's error naming the file and line."""
    try:
        yield
    except MoraTrainError:
        raise
    except Exception as err:  # noqa: BLE001 - builders raise DatasetGenerationError, ArrowInvalid, ValueError, ...
        raise file_error(files, fmt, err) from None


def quiet_logs() -> contextlib.AbstractContextManager[None]:
    """datasets logs an ERROR for a file it cannot read: the caller reports the error itself, naming the line."""
    return logger_level("datasets", logging.CRITICAL)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No datasets error log (quiet_logs) and no progress bars: a bar per small file read is noise."""
    from datasets import utils

    turn_bars_off = not utils.are_progress_bars_disabled()
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps them, with a warning
        warnings.simplefilter("ignore")
        if turn_bars_off:
            utils.disable_progress_bars()
    try:
        with quiet_logs():
            yield
    finally:
        if turn_bars_off:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                utils.enable_progress_bars()

"""Data sources: every local format, globs and folders, hub loading (mocked), field mapping, filters, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mora_train.core.errors import MoraTrainError
from mora_train.data import sources
from mora_train.data.config import DataSource, IdFilter, source_problems
from mora_train.data.sources import Record, load_records, map_fields, render


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def values(records: list[Record]) -> list[dict]:
    return [r.values for r in records]


def test_every_local_format_reads_the_same_records(tmp_path: Path) -> None:
    rows = [{"q": "one", "a": "1"}, {"q": "two, with a comma", "a": "2"}]
    jsonl(tmp_path / "d.jsonl", rows)
    write(tmp_path / "d.json", json.dumps(rows))
    write(tmp_path / "d.csv", 'q,a\none,1\n"two, with a comma",2\n')
    write(tmp_path / "d.tsv", "q\ta\none\t1\ntwo, with a comma\t2\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for ext in ("jsonl", "json", "csv", "tsv", "parquet"):
        assert values(load_records(str(tmp_path / f"d.{ext}"), "k")) == rows, ext


def test_json_object_keyed_by_id_and_wrapped_list(tmp_path: Path) -> None:
    write(tmp_path / "keyed.json", json.dumps({"123": {"q": "x"}, "456": {"q": "y"}}))
    assert values(load_records(str(tmp_path / "keyed.json"), "k")) == [{"id": "123", "q": "x"}, {"id": "456", "q": "y"}]
    write(tmp_path / "wrapped.json", json.dumps({"version": 1, "data": [{"q": "x"}]}))
    assert values(load_records(str(tmp_path / "wrapped.json"), "k")) == [{"q": "x"}]


def test_txt_units(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "first para\nstill first\n\nsecond para\r\n")
    # datasets reads .txt files in Python's text mode: a Windows line end is read as "\n".
    assert values(load_records({"path": str(tmp_path / "a.txt")}, "k")) == [
        {"text": "first para\nstill first\n\nsecond para\n"}
    ]
    assert values(load_records({"path": str(tmp_path / "a.txt"), "text_unit": "line"}, "k")) == [
        {"text": "first para"},
        {"text": "still first"},
        {"text": "second para"},
    ]
    assert values(load_records({"path": str(tmp_path / "a.txt"), "text_unit": "paragraph"}, "k")) == [
        {"text": "first para\nstill first"},
        {"text": "second para"},
    ]


def test_globs_folders_lists_and_limit(tmp_path: Path) -> None:
    jsonl(tmp_path / "x" / "b.jsonl", [{"n": 2}])
    jsonl(tmp_path / "x" / "a.jsonl", [{"n": 0}, {"n": 1}])
    write(tmp_path / "x" / "notes.md", "ignored in a folder")
    assert [r.values["n"] for r in load_records(str(tmp_path / "x" / "*.jsonl"), "k")] == [0, 1, 2]
    assert [r.values["n"] for r in load_records(str(tmp_path / "x"), "k")] == [0, 1, 2]
    assert [r.values["n"] for r in load_records({"path": str(tmp_path / "x"), "limit": 2}, "k")] == [0, 1]
    both = [str(tmp_path / "x" / "b.jsonl"), str(tmp_path / "x" / "a.jsonl")]
    assert [r.values["n"] for r in load_records([{"path": both[0]}, {"path": both[1]}], "k")] == [2, 0, 1]


def test_line_separators_inside_json_strings_do_not_split_records(tmp_path: Path) -> None:
    # PubMedQA holds U+2029 inside an abstract; str.splitlines() would cut that record in two.
    jsonl(tmp_path / "d.jsonl", [{"t": "para one\u2029para two\u2028x\x1cy"}, {"t": "next"}])
    assert [r.values["t"] for r in load_records(str(tmp_path / "d.jsonl"), "k")] == [
        "para one\u2029para two\u2028x\x1cy",
        "next",
    ]


def test_keep_and_drop_filters(tmp_path: Path) -> None:
    jsonl(tmp_path / "d.jsonl", [{"id": 1}, {"id": 2}, {"id": 3}])
    write(tmp_path / "ids.json", json.dumps({"1": "yes", "3": "no"}))
    write(tmp_path / "ids.txt", "2\n")
    keep = {"path": str(tmp_path / "d.jsonl"), "keep_if_in": {"field": "id", "file": str(tmp_path / "ids.json")}}
    assert [r.values["id"] for r in load_records(keep, "k")] == [1, 3]
    drop = {"path": str(tmp_path / "d.jsonl"), "drop_if_in": {"field": "id", "file": str(tmp_path / "ids.txt")}}
    assert [r.values["id"] for r in load_records(drop, "k")] == [1, 3]


def test_hub_source_goes_through_datasets_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None, streaming=False, **kwargs):
        calls.append((name, config, split, revision))
        assert streaming is False
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records({"hub": "openai/gsm8k", "hub_config": "main", "split": "test", "limit": 5}, "task.data.eval")
    assert calls == [("openai/gsm8k", "main", "test[:5]", None)]
    assert records[0].values == {"question": "q", "answer": "#### 1"}
    assert "openai/gsm8k" in records[0].where and "row 0" in records[0].where


def test_hub_failure_says_how_to_use_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'meta-math/MetaMathQA' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        MoraTrainError, match=r"meta-math/MetaMathQA.*task\.data\.train\.hub=null task\.data\.train\.path=DIR"
    ):
        load_records({"hub": "meta-math/MetaMathQA", "split": "train"}, "task.data.train")


def test_field_mapping_paths_templates_and_lists() -> None:
    record = Record(
        {
            "title": "T",
            "abstract": ["a1", "a2"],
            "instances": [{"input": "", "output": "o"}],
            "options": {"A": "x"},
            "Price Direction Up": 1,
        },
        "f line 1",
    )
    mapped = map_fields(
        record,
        {"text": "{title}\n{abstract}", "out": "instances.0.output", "opt": "options.A", "up": "Price Direction Up"},
        "task.data.fields",
        ("text", "out", "opt", "up"),
    )
    assert mapped == {"text": "T\na1\na2", "out": "o", "opt": "x", "up": 1}
    assert render("{{literal}} {title}", record, "k") == "{literal} T"
    # A source's own mapping wins over the task's.
    record.fields = {"out": "title"}
    assert map_fields(record, {"out": "instances.0.output"}, "task.data.fields", ("out",)) == {"out": "T"}


def test_optional_fields_may_be_absent() -> None:
    record = Record({"instruction": "i", "output": "o"}, "f line 3")
    mapped = map_fields(
        record,
        {"instruction": "instruction", "output": "output", "input": "input"},
        "task.data.fields",
        ("instruction", "output"),
        ("input",),
    )
    assert mapped == {"instruction": "i", "output": "o"}


# ---------------------------------------------------------------------------------- bad data


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("bad.jsonl", '{"q": 1}\n{"q": 2\n', r"bad\.jsonl line 2: not valid JSON"),
        ("list.jsonl", '{"q": 1}\n\n[1, 2]\n', r"list\.jsonl line 3: expected a JSON object"),
        ("bad.json", '[\n {"q": 1},\n {"q": }\n]', r"bad\.json line 3: not valid JSON"),
        ("bad.csv", "q,a\n1,2\n3,4,5\n", r"bad\.csv line 3: 3 fields, but the header has 2"),
        ("bad.txt", b"fine\n\xff\xfe broken\n", r"bad\.txt line 2: not valid UTF-8"),
        ("bad.parquet", b"not parquet", r"bad\.parquet: not a readable parquet file"),
        ("data.xml", "<x/>", r"unsupported file type '\.xml'"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path: Path, name: str, content: str | bytes, pattern: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(MoraTrainError, match=pattern):
        load_records(str(path), "task.data.train")


def test_missing_field_names_it_and_the_fields_present() -> None:
    record = Record({"query": "q", "response": "r"}, "train.jsonl line 7")
    with pytest.raises(MoraTrainError) as err:
        map_fields(record, {"question": "question"}, "task.data.fields", ("question",))
    message = str(err.value)
    assert "train.jsonl line 7" in message and "'question'" in message
    assert "query, response" in message and "task.data.fields.question" in message


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(MoraTrainError, match="gave no records"):
        load_records(str(tmp_path / "empty.jsonl"), "task.data.train")
    jsonl(tmp_path / "d.jsonl", [{"id": 1}])
    write(tmp_path / "none.txt", "9\n")
    with pytest.raises(MoraTrainError, match="gave no records"):
        load_records(
            {"path": str(tmp_path / "d.jsonl"), "keep_if_in": {"field": "id", "file": str(tmp_path / "none.txt")}}, "k"
        )


def test_source_config_problems(tmp_path: Path) -> None:
    assert "does not exist" in source_problems(str(tmp_path / "nope.jsonl"), "task.data.train")[0]
    assert "matches no file" in source_problems(str(tmp_path / "*.jsonl"), "task.data.train")[0]
    both = source_problems({"path": str(tmp_path), "hub": "a/b", "split": "train"}, "task.data.train")
    assert any("exactly one of `path`" in p for p in both)
    assert any("split" in p for p in source_problems({"hub": "a/b"}, "task.data.train"))
    unknown = source_problems({"path": str(tmp_path), "spilt": "x"}, "k")
    assert any("`k.spilt` is not a known key (did you mean split?)" in p for p in unknown)
    assert "`k.limit=0` must be a positive integer" in "\n".join(
        source_problems({"path": str(tmp_path), "limit": 0}, "k")
    )
    (unset,) = source_problems(None, "task.data.eval")
    assert "`task.data.eval` is not set" in unset
    assert "empty list" in source_problems([], "task.data.eval")[0]
    # A typed source is checked the same way: list items are named by their index.
    typed = [DataSource(path=str(tmp_path / "nope.jsonl")), DataSource(hub="a/b")]
    problems = source_problems(typed, "task.data.train")
    assert "`task.data.train[0].path=" in problems[0] and "`task.data.train[1].split` must be set" in problems[1]


def test_typed_and_plain_sources_read_the_same(tmp_path: Path) -> None:
    jsonl(tmp_path / "d.jsonl", [{"id": 1}, {"id": 2}, {"id": 3}])
    write(tmp_path / "ids.txt", "2\n")
    plain = {
        "path": str(tmp_path / "d.jsonl"),
        "drop_if_in": {"field": "id", "file": str(tmp_path / "ids.txt")},
        "limit": 1,
    }
    typed = DataSource(
        path=str(tmp_path / "d.jsonl"), drop_if_in=IdFilter(field="id", file=str(tmp_path / "ids.txt")), limit=1
    )
    assert values(load_records(plain, "k")) == values(load_records(typed, "k")) == [{"id": 1}]
    assert sources.fingerprint_sources(plain) == sources.fingerprint_sources([typed])


def test_data_dir_resolvers_pick_the_local_file_or_the_hub() -> None:
    from mora_train.config.resolvers import data_file, hub_dataset, local_or_hub

    assert data_file(None, "gsm8k/train.jsonl") is None and hub_dataset(None, "openai/gsm8k") == "openai/gsm8k"
    assert data_file("/data", "gsm8k/train.jsonl") == "/data/gsm8k/train.jsonl" and hub_dataset("/data", "a/b") is None
    assert local_or_hub("/data", "local", "hub") == "local" and local_or_hub(None, "local", "hub") == "hub"
    assert sources  # the module under test imports cleanly on its own


# -- a path that gives no data file says what it is, not "does not exist" ------------------------------------


def test_a_folder_without_data_files_is_described(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write(tmp_path / "notes" / "readme.md", "hello")
    (empty,) = source_problems(str(tmp_path / "empty"), "task.data.train")
    (notes,) = source_problems(str(tmp_path / "notes"), "task.data.train")
    assert "is a folder with no data file" in empty and "it is empty" in empty and "does not exist" not in empty
    assert "only .md files" in notes and ".jsonl" in notes


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_a_fifo_or_a_device_is_not_a_regular_file(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")
    (pipe,) = source_problems(str(tmp_path / "pipe.jsonl"), "task.data.train")
    assert "named pipe (FIFO)" in pipe and "not a regular file" in pipe and "does not exist" not in pipe
    if Path("/dev/null").exists():
        (device,) = source_problems("/dev/null", "task.data.train")
        assert "character device" in device


def test_a_dangling_link_and_a_folder_for_an_id_file(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (link,) = source_problems(str(tmp_path / "data.jsonl"), "task.data.train")
    assert "symbolic link" in link and "gone.jsonl" in link
    jsonl(tmp_path / "ok.jsonl", [{"id": 1}])
    (ids,) = source_problems(
        {"path": str(tmp_path / "ok.jsonl"), "keep_if_in": {"field": "id", "file": str(tmp_path)}}, "k"
    )
    assert "keep_if_in.file" in ids and "is a folder; give a file" in ids


def test_too_long_advice_follows_the_policy_in_force() -> None:
    from mora_train.data.common import LengthReport, require_examples

    report = LengthReport(total=3, truncated=0, dropped=3)
    with pytest.raises(MoraTrainError) as dropped:
        require_examples([], "task.data.train", report, 64, "drop")
    assert "set task.too_long=truncate" in str(dropped.value)
    with pytest.raises(MoraTrainError) as truncated:  # already truncating: what is left to change is the length
        require_examples([], "task.data.train", report, 64, "truncate")
    message = str(truncated.value)
    assert "too_long=truncate" not in message and "response token" in message and "max_seq_len" in message

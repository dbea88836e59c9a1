"""Data through 🤗 datasets: weighted mixing, tokenization in several processes and its fingerprint cache, packed
text map-style and streamed, and the errors of the keys that drive them."""

from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from mora_train.core.errors import ConfigError, MoraTrainError
from mora_train.data import prepare
from mora_train.data.corpus import PACK_DOCUMENTS, packed_blocks, stream_blocks
from mora_train.data.sources import Record, load_records, map_fields
from mora_train.models import byte_tokenizer
from mora_train.pipeline.run_config import read_run_config
from tests.conftest import compose_config, validate_config


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def problems_of(tmp_path: Path, *overrides: str) -> list[str]:
    return read_run_config(compose_config(["model=tiny-llama", *overrides], tmp_path))[1]


# ---------------------------------------------------------------------------------- weights and mixing


def test_bad_weights_are_refused_naming_the_key(tmp_path: Path) -> None:
    a, b = jsonl(tmp_path / "a.jsonl", [{"text": "a"}]), jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    base = ["task=pretrain", f"task.data.eval={a}"]

    def train(*weights: object) -> str:
        items = [
            f"{{path: {p}" + (f", weight: {w}}}" if w is not None else "}")
            for p, w in zip((a, b), weights, strict=True)
        ]
        return f"task.data.train=[{', '.join(items)}]"

    negative = "\n".join(problems_of(tmp_path, *base, train(-1, 2)))
    assert "`task.data.train[0].weight=-1.0` must be a positive number" in negative
    zero = "\n".join(problems_of(tmp_path, *base, train(0, 0)))
    assert "`task.data.train[0].weight=0.0`" in zero and "`task.data.train[1].weight=0.0`" in zero
    partial = "\n".join(problems_of(tmp_path, *base, train(2, None)))
    assert "task.data.train[1] has no `weight` while other sources have one" in partial
    single = "\n".join(problems_of(tmp_path, *base, f"task.data.train=[{{path: {a}, weight: 2}}]"))
    assert "`task.data.train[0].weight` is set but `task.data.train` has a single source" in single
    held_out = "\n".join(problems_of(tmp_path, *base, train(1, 1), f"task.data.eval={{path: {a}, weight: 1}}"))
    assert "`task.data.eval` has a `weight`, which only mixes training sources" in held_out
    assert problems_of(tmp_path, *base, train(3, 1.5)) == []
    stop = "\n".join(problems_of(tmp_path, *base, train(3, 1), "task.data.mixing_stop=longest"))
    assert "task.data.mixing_stop" in stop and "first_exhausted" in stop and "all_exhausted" in stop


def test_weighted_sources_are_interleaved_in_proportion(tmp_path: Path) -> None:
    a = jsonl(tmp_path / "a.jsonl", [{"s": "a", "i": i} for i in range(400)])
    b = jsonl(tmp_path / "b.jsonl", [{"s": "b", "i": i} for i in range(400)])
    spec = [{"path": a, "weight": 3}, {"path": b, "weight": 1}]
    first = load_records(spec, "k")
    counts = Counter(r.values["s"] for r in first)
    # first_exhausted: the mix ends when `a` (drawn 3 times in 4) runs out, with about a third as many from `b`.
    assert counts["a"] == 400 and 100 <= counts["b"] <= 170
    assert [r.values["i"] for r in first if r.values["s"] == "b"] == list(range(counts["b"]))  # each source in order
    assert [r.where for r in first[:50]] == [r.where for r in load_records(spec, "k")[:50]]  # the seed fixes the mix
    other = load_records(spec, "k", mixing_seed=1)
    assert [r.values["s"] for r in other] != [r.values["s"] for r in first]
    every = load_records(spec, "k", mixing_stop="all_exhausted")
    assert {r.values["i"] for r in every if r.values["s"] == "b"} == set(range(400))  # all of `b` read
    assert Counter(r.values["s"] for r in every)["a"] > 400  # `a` started over meanwhile
    # Unweighted sources are read in order, one after the other.
    assert [r.values["s"] for r in load_records([a, b], "k")] == ["a"] * 400 + ["b"] * 400


# ---------------------------------------------------------------------------------- tokenizing in datasets


def encoder(tokenizer):
    def encode(record: Record) -> tuple[list[int], list[int]]:
        text = map_fields(record, {"text": "text"}, "task.data.fields", ("text",))["text"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, ids

    return encode


def test_num_proc_gives_the_same_examples_and_a_second_run_hits_the_cache(tmp_path: Path) -> None:
    rows = [{"text": f"record number {i} " + "x" * (i % 40)} for i in range(300)]
    train = jsonl(tmp_path / "train.jsonl", rows)
    encode = encoder(byte_tokenizer())
    kwargs = {"key_parts": {"recipe": "test"}, "max_seq_len": 32, "too_long": "drop"}
    one, meta = prepare.tokenize_records(train, "k", encode, cache_dir=str(tmp_path / "c1"), num_proc=None, **kwargs)
    two, meta2 = prepare.tokenize_records(train, "k", encode, cache_dir=str(tmp_path / "c2"), num_proc=2, **kwargs)
    assert one == two and len(one) == meta["examples_read"] - meta["dropped"] and meta["dropped"] > 0
    assert meta["cache"] == meta2["cache"] == "miss" and meta["cache_path"] == str(tmp_path / "c1")
    assert list((tmp_path / "c2").rglob("cache-*_00001_of_00002.arrow"))  # two processes wrote a shard each
    again, meta3 = prepare.tokenize_records(train, "k", encode, cache_dir=str(tmp_path / "c2"), num_proc=2, **kwargs)
    assert meta3["cache"] == "hit" and again == one
    changed = {**kwargs, "max_seq_len": 64}
    assert (
        prepare.tokenize_records(train, "k", encode, cache_dir=str(tmp_path / "c2"), num_proc=2, **changed)[1]["cache"]
        == "miss"
    )
    jsonl(tmp_path / "train.jsonl", rows[:5])  # new content: a new fingerprint
    _, meta4 = prepare.tokenize_records(train, "k", encode, cache_dir=str(tmp_path / "c2"), num_proc=2, **kwargs)
    assert meta4["cache"] == "miss" and meta4["examples_read"] == 5


def test_a_worker_process_error_names_the_line(tmp_path: Path) -> None:
    rows = [{"text": "fine"}] * 40 + [{"body": "no text field"}]
    train = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(MoraTrainError, match=r"train\.jsonl line 41: field 'text' is missing.*fields: body"):
        prepare.tokenize_records(
            train,
            "k",
            encoder(byte_tokenizer()),
            key_parts={},
            cache_dir=None,
            num_proc=2,
            max_seq_len=8,
            too_long="drop",
        )


def test_without_a_cache_dir_datasets_writes_into_a_temporary_folder() -> None:
    folder = prepare.cache_folder(None)
    assert folder.startswith(tempfile.gettempdir()) and Path(folder).is_dir()
    assert prepare.cache_folder(None) == folder  # one per process, removed at exit


# ---------------------------------------------------------------------------------- packed text, map-style and streamed


def corpus(tmp_path: Path) -> list[dict]:
    docs = jsonl(
        tmp_path / "docs.jsonl", [{"title": f"T{i}", "body": "w " * (i % 11)} for i in range(PACK_DOCUMENTS + 300)]
    )
    (tmp_path / "paras.txt").write_text("\n\n".join(f"paragraph {i} " + "z" * (i % 7) for i in range(500)))
    return [
        {"path": docs, "fields": {"text": "{title}: {body}"}, "weight": 2},
        {"path": str(tmp_path / "paras.txt"), "text_unit": "paragraph", "weight": 1},
    ]


def test_streamed_blocks_are_the_map_style_blocks_and_start_over(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    spec = corpus(tmp_path)
    common = {"fields": {"text": "text"}, "block_size": 48, "cache_dir": str(tmp_path / "cache")}
    mixing = ("all_exhausted", 0)
    blocks, meta = packed_blocks(
        spec, "task.data.train", "byte", tokenizer, limit=None, num_proc=2, mixing=mixing, **common
    )
    assert meta["blocks"] == len(blocks) and meta["tokens"] >= sum(len(b["input_ids"]) for b in blocks)
    short = [i for i, b in enumerate(blocks) if len(b["input_ids"]) < 48]
    assert 1 <= len(short) <= meta["documents"] // PACK_DOCUMENTS + 1  # one shorter block per batch of documents
    stream = stream_blocks(spec, "task.data.train", tokenizer, mixing=mixing, **common)
    streamed = list(itertools.islice(iter(stream), len(blocks) + 3))
    assert streamed[: len(blocks)] == list(blocks)
    assert streamed[len(blocks) :] == list(blocks[:3])  # the end of the mix: read again from the start
    assert stream[:2] == list(blocks[:2])
    again, meta2 = packed_blocks(
        spec, "task.data.train", "byte", tokenizer, limit=None, num_proc=2, mixing=mixing, **common
    )
    assert meta2["cache"] == "hit" and again == blocks


def test_a_bad_line_met_while_streaming_names_the_file_and_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(300)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    stream = stream_blocks(
        str(tmp_path / "big.jsonl"),
        "task.data.train",
        byte_tokenizer(),
        fields={"text": "text"},
        block_size=64,
        cache_dir=str(tmp_path / "cache"),
        mixing=("first_exhausted", 0),
    )
    # The file goes bad after the stream was built (building it reads the first block): the error comes from the
    # read the training loop makes, as the project's error naming the line.
    lines[200] = '{"text": "broken'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MoraTrainError, match=r"big\.jsonl line 201: not valid JSON"):
        list(itertools.islice(iter(stream), 1000))
    # Met while building the stream, the same error.
    with pytest.raises(MoraTrainError, match=r"big\.jsonl line 201: not valid JSON"):
        stream_blocks(
            str(tmp_path / "big.jsonl"),
            "task.data.train",
            byte_tokenizer(),
            fields={"text": "text"},
            block_size=64,
            cache_dir=str(tmp_path / "cache"),
            mixing=("first_exhausted", 0),
        )


def test_streaming_keys_are_checked(tmp_path: Path) -> None:
    base = ["task=pretrain", "task.data.streaming=true"]
    with pytest.raises(ConfigError) as no_budget:
        validate_config(compose_config(["model=tiny-llama", *base, "trainer.max_steps=0"], tmp_path))
    assert "`task.data.streaming=true`" in str(no_budget.value) and "`trainer.max_steps=0`" in str(no_budget.value)
    assert any("task.num_proc=2" in p for p in problems_of(tmp_path, *base, "task.num_proc=2"))
    assert any(
        "`task.num_proc=0` must be a positive integer" in p
        for p in problems_of(tmp_path, "task=biomed", "task.num_proc=0")
    )
    unknown = problems_of(tmp_path, "task=gsm8k", "+task.data.streaming=true")
    assert any("`task.data.streaming` is not a known key" in p for p in unknown)  # pretraining recipes only


def test_a_streamed_hub_split_is_cut_to_its_first_records(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None, streaming=False, **kwargs):
        calls.append((name, split, revision, streaming))
        rows = [{"text": f"hub text {i}"} for i in range(50)]
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = {"hub": "org/corpus", "split": "train[:7]", "revision": "v1.0"}
    kwargs = {"fields": {"text": "text"}, "block_size": 16, "cache_dir": None, "mixing": ("first_exhausted", 0)}
    stream = stream_blocks(hub, "task.data.train", byte_tokenizer(), **kwargs)
    assert calls == [("org/corpus", "train", "v1.0", True)]
    tokenizer = byte_tokenizer()
    text = "".join(tokenizer.decode(b["input_ids"]) for b in itertools.islice(iter(stream), 30))
    assert "hub text 6" in text and "hub text 7" not in text
    with pytest.raises(MoraTrainError, match=r"task\.data\.train\.split=train\[10:20\].*task\.data\.train\.limit=N"):
        stream_blocks({**hub, "split": "train[10:20]"}, "task.data.train", byte_tokenizer(), **kwargs)


# ---------------------------------------------------------------------------------- formats datasets reads


def test_arrow_files_and_mixed_types_read(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"q": "x", "n": 1}, {"q": "y", "n": 2}]).to_parquet(tmp_path / "d.parquet")
    dataset = datasets.Dataset.from_parquet(str(tmp_path / "d.parquet"), cache_dir=str(tmp_path / "c"))
    arrow = Path(dataset.cache_files[0]["filename"])
    assert [r.values for r in load_records(str(arrow), "k")] == [{"q": "x", "n": 1}, {"q": "y", "n": 2}]
    assert [r.where for r in load_records(str(arrow), "k")] == [f"{arrow} row 0", f"{arrow} row 1"]
    mixed = jsonl(tmp_path / "mixed.jsonl", [{"label": 1}, {"label": "two"}, {"other": True}])
    records = load_records(mixed, "k")
    assert [r.values for r in records] == [{"label": 1}, {"label": "two"}, {"other": True}]
    with pytest.raises(MoraTrainError, match=r"mixed\.jsonl line 3: field 'label' is missing.*fields: other"):
        map_fields(records[2], {"label": "label"}, "task.data.fields", ("label",))

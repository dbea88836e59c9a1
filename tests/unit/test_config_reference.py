"""docs/config-reference.md is generated from the typed sections: it is fresh, complete, and every key and
default in it is the schema's."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mora_train.config.reference import format_value, reference_keys, render_reference
from mora_train.config.schema import Section, default_of, field_types, parse, setting

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "config-reference.md"
REGENERATE = "run `python scripts/config_reference.py --write` (and commit docs/config-reference.md)"


def load_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference_script", REPO / "scripts" / "config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> types.ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def run_config_and_variants(script: types.ModuleType) -> tuple[type[Section], dict[str, dict[str, type[Section]]]]:
    return script.RunConfig, {key: found for key, found in script.variants().items() if found}


# --- an independent walk of the schema ------------------------------------------------------------------


def section_of(tp: Any) -> tuple[type[Section], str] | None:
    """The section class a field holds (a section, an optional one, a mapping or list of them) and the suffix
    its keys continue with."""
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp, ""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return section_of(members[0]) if len(members) == 1 else None
    if origin is dict and len(args) == 2 and (inner := section_of(args[1])):
        return inner[0], ".<name>" + inner[1]
    if origin is list and len(args) == 1 and (inner := section_of(args[0])):
        return inner[0], "[]" + inner[1]
    return None


def schema_keys(cls: type[Section], path: str, label: str, variants: dict) -> Iterator[tuple[str, str, type, str]]:
    """(variant label, dotted key, declaring section class, field name) of every key under `cls`."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{path}.{f.name}" if path else f.name
        if key in variants:
            by_class: dict[type, list[str]] = {}
            for name, variant in variants[key].items():
                by_class.setdefault(variant, []).append(name)
            for variant, names in by_class.items():
                yield from schema_keys(variant, key, ", ".join(f"{f.name}={n}" for n in names), variants)
        elif inner := section_of(field_types(cls)[f.name]):
            yield from schema_keys(inner[0], key + inner[1], label, variants)
        else:
            yield label, key, cls, f.name


def all_sections(cls: type[Section], variants: dict, seen: set[type] | None = None) -> set[type]:
    seen = set() if seen is None else seen
    if cls in seen:
        return seen
    seen.add(cls)
    for tp in field_types(cls).values():
        if inner := section_of(tp):
            all_sections(inner[0], variants, seen)
    for choices in variants.values():
        for variant in choices.values():
            all_sections(variant, variants, seen)
    return seen


# --- the doc as rows ------------------------------------------------------------------------------------

ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<type>.*?) \| (?P<default>\*required\*|`.*?`) \| `(?P<owner>[^`]+)` \| ")


def doc_rows(text: str) -> list[dict[str, str]]:
    """Each key row of the reference with the variant label of its table ('' outside the variant tables)."""
    rows, label = [], ""
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            nested = re.search(r"\((.+=.+)\)$", title)
            label = nested.group(1) if nested else (title if "=" in title else "")
        elif match := ROW.match(line):
            rows.append({**match.groupdict(), "label": label})
    return rows


# --- tests ----------------------------------------------------------------------------------------------


def test_committed_reference_is_fresh(script: types.ModuleType) -> None:
    assert DOC.is_file(), f"docs/config-reference.md is missing; {REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == script.config_reference(), (
        f"docs/config-reference.md is stale (a config section changed); {REGENERATE}"
    )


def test_every_key_has_a_one_line_help(run_config_and_variants) -> None:
    root, variants = run_config_and_variants
    missing = [
        f"{cls.__module__}.{cls.__qualname__}.{f.name}"
        for cls in all_sections(root, variants)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if not str(f.metadata.get("help", "")).strip()
    ]
    assert not missing, f"these config keys have no help (setting(default=default, help='...')): {missing}"


def test_doc_lists_exactly_the_schema_keys(run_config_and_variants) -> None:
    root, variants = run_config_and_variants
    expected = Counter((label, key) for label, key, _, _ in schema_keys(root, "", "", variants))
    listed = Counter((row["label"], row["key"]) for row in doc_rows(DOC.read_text(encoding="utf-8")))
    assert listed == expected, (
        f"docs/config-reference.md lists {sorted((listed - expected).elements())} that the schema does not hold and "
        f"misses {sorted((expected - listed).elements())}; {REGENERATE}"
    )
    assert sum(expected.values()) == len(reference_keys(root, variants))


def test_doc_defaults_and_owners_are_the_schema_ones(run_config_and_variants) -> None:
    """Each default in the doc reads back (as YAML, as on the command line) as the field's default."""
    root, variants = run_config_and_variants
    fields = {(label, key): (cls, name) for label, key, cls, name in schema_keys(root, "", "", variants)}
    for row in doc_rows(DOC.read_text(encoding="utf-8")):
        cls, name = fields[(row["label"], row["key"])]
        default = default_of(cls, name)
        if row["default"] == "*required*":
            assert default is dataclasses.MISSING, row
            continue
        text = row["default"].strip("`").replace("\\|", "|")
        assert yaml.safe_load(text) == default, f"{row['key']}: the doc says {text}, the schema {default!r}"
        declaring = next(k for k in cls.__mro__ if name in getattr(k, "__annotations__", {}))
        assert row["owner"] == declaring.__module__, row


def test_task_and_adapter_variants_get_a_table_each(run_config_and_variants) -> None:
    _, variants = run_config_and_variants
    text = DOC.read_text(encoding="utf-8")
    for name in variants["adapter"]:
        assert re.search(rf"^### .*\badapter={name}\b", text, re.MULTILINE), f"no table for adapter={name}"
    for name in variants.get("task", {}):
        assert re.search(rf"^### .*\btask={name}\b", text, re.MULTILINE), f"no table for task={name}"
    assert "+trainer.hf." in text and "TrainingArguments" in text


def test_check_reports_a_stale_file(script: types.ModuleType, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(script, "DOC", tmp_path / "config-reference.md")
    assert script.main(["--check"]) == 1
    assert "python scripts/config_reference.py --write" in capsys.readouterr().out
    assert script.main(["--write"]) == 0
    assert script.main(["--check"]) == 0


# --- the renderer on sections made for the test -----------------------------------------------------------


class Leaf(Section):
    size: int = setting(default=3, help="a size | with a bar")


class Alpha(Section):
    """Variant alpha."""

    name: str = setting(help="the variant")
    a: float = setting(default=0.5, help="alpha's own key")


class Beta(Section):
    name: str = setting(help="the variant")
    leaf: Leaf = setting(factory=Leaf, help="beta's nested section")


class Root(Section):
    mode: Literal["x", "y"] = setting(default="x", help="a choice")
    text: str = setting(default="null", help="a string that YAML would read as null")
    maybe: Leaf | None = setting(default=None, help="an optional section")
    many: dict[str, Leaf] = setting(factory=dict, help="sections by name")
    items: list[Leaf] = setting(factory=list, help="a list of sections")
    kind: Any = setting(default=None, help="picked by kind.name")
    loose: Any = setting(default=None, help="not typed yet")


def test_render_reference_walks_variants_nested_and_untyped_fields() -> None:
    variants = {"kind": {"a": Alpha, "b": Beta, "c": Alpha}}
    text = render_reference(Root, variants, notes={"maybe": "A note on maybe."})
    assert "### kind=a, kind=c" in text and "### kind=b" in text and "#### `kind.leaf` (kind=b)" in text
    assert "## `many.<name>`" in text and "- [`many.<name>`](#manyname)" in text
    assert "Variant alpha. Declared in `tests.unit.test_config_reference.Alpha`." in text
    for key in ("maybe.size", "many.<name>.size", "items[].size", "kind.a", "kind.leaf.size"):
        assert f"| `{key}` |" in text, key
    assert "| `loose` | anything | `null` |" in text
    assert "A type of *anything*" in text and "A type of *anything*" not in render_reference(Leaf)
    assert '| `text` | str | `"null"` |' in text
    assert "| `kind.name` | str | *required* |" in text
    assert "a size \\| with a bar" in text
    assert "an optional section; or null." in text and "A note on maybe." in text
    assert "- [kind=a, kind=c](#kinda-kindc)" in text
    assert reference_keys(Root, variants).count("kind.name") == 2


@pytest.mark.parametrize(
    "value, written",
    [
        (None, "null"),
        (True, "true"),
        (2e-4, "0.0002"),
        (1e-5, "1.0e-05"),
        (float("inf"), ".inf"),
        ("auto", "auto"),
        ("1", '"1"'),
        ("a,b", '"a,b"'),
        (["q_proj", 1], "[q_proj, 1]"),
        ({}, "{}"),
        ({"k": None}, "{k: null}"),
    ],
)
def test_format_value_reads_back_as_yaml(value: Any, written: str) -> None:
    assert format_value(value) == written
    assert yaml.safe_load(written) == value


def nested(rows: list[dict[str, str]]) -> dict[str, Any]:
    """A config mapping from the doc's rows: each key set to its documented default."""
    values: dict[str, Any] = {}
    for row in rows:
        if row["default"] == "*required*" or "<name>" in row["key"] or "[]" in row["key"]:
            continue
        *parents, leaf = row["key"].split(".")
        target = values
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(row["default"].strip("`").replace("\\|", "|"))
    return values


def test_doc_keys_and_defaults_parse_as_a_config(run_config_and_variants) -> None:
    """Each variant's documented keys, at their documented defaults, parse with no unknown key or wrong type."""
    root, _ = run_config_and_variants
    rows = doc_rows(DOC.read_text(encoding="utf-8"))
    labels = {row["label"] for row in rows if row["label"]}
    for label in sorted(labels):
        group, name = label.split(", ")[0].split("=")
        config = nested([row for row in rows if row["label"] in ("", label)])
        config.setdefault(group, {})["name"] = name
        problems: list[str] = []
        parse(root, config, "", problems)
        wrong = [p for p in problems if re.search(r"is not a known key|` must be .+, got |is unknown; use", p)]
        assert not wrong, f"{label}: {wrong}"

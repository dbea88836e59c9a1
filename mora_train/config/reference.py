"""The config reference (docs/config-reference.md), rendered from the typed sections themselves.

Every key of a section class (a `Section` subclass: a dataclass whose fields are `setting(default=..., help=...)`)
becomes one row: its dotted path, its type as messages name it, its default, the module that declares it, and its help.
A field whose class depends on a value (`adapter` by adapter.name, `task` by task.name) gets one table per
variant; the caller passes the variants in, since config/ cannot import the layers that register them.
`scripts/config_reference.py` writes the file; a unit test fails when the file is stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from mora_train.config.schema import Section, default_of, type_name

# {dotted path of a field: {variant name: its section class}}, e.g. {"adapter": {"lora": LoraSettings}}
Variants = Mapping[str, Mapping[str, type[Section]]]

HEADER = """\
# Config reference

<!-- Generated from the typed config sections; do not edit. Regenerate: python scripts/config_reference.py --write -->

Every key `mora-train` reads, generated from the typed sections that declare them (each a `Section` dataclass
beside the code that owns it; the root is `RunConfig` in `mora_train/pipeline/run_config.py`). Regenerate with
`python scripts/config_reference.py --write` after changing a section; `python scripts/config_reference.py --check`
(and tests/unit/test_config_reference.py) fails when this file is stale. Usage, config groups and examples are
in the [README](../README.md#using-it).

**Setting keys.** On the command line, `key=value` changes a key the composed config holds
(`trainer.max_steps=100`, `adapter.mora_type=sharing`, `trainer.restart.every_steps=500`); `group=option`
picks a config file (`model=tiny-llama`, `adapter=lora`, `task=gsm8k`); `+key=value` adds a key the YAML does
not hold, such as any `trainer.hf.*` field (`+trainer.hf.neftune_noise_alpha=5`). Every key is checked
before anything loads: an unknown key names the closest known ones, a wrong type names the expected one, and
all problems come in one message.

**Defaults.** The default column is the section's own default. A config file chosen by a group may set its own
value (`model=smollm2-135m` sets `model.name_or_path`, `task=uuid` selects `trainer=memorize`);
`mora-train --cfg job ...` prints the composed config of a command line. *required*: no default, the config
group or the command line must set it.
"""
UNTYPED = "A type of *anything*: a key whose section is not typed yet (its value is passed on unchecked).\n"


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str | None  # None: required (no default)
    owner: str
    help: str


@dataclasses.dataclass
class Table:
    """One section's keys under a heading (`trainer.restart`, `adapter=lora`, `task.eval (task=uuid)`)."""

    title: str
    path: str
    description: str
    rows: list[Row]
    depth: int


def render_reference(
    root: type[Section], variants: Variants | None = None, notes: Mapping[str, str] | None = None
) -> str:
    """The reference of every key under `root`, as markdown. `notes` adds a paragraph after the table that
    holds a key or section, by its dotted path (e.g. what goes under a free-form mapping)."""
    tables = list(reference_tables(root, variants or {}))
    untyped = any(row.type == type_name(Any) for table in tables for row in table.rows)
    out = [HEADER + (UNTYPED if untyped else ""), "## Contents", "", *_contents(tables), ""]
    pending = dict(notes or {})  # each note once, after the first table that holds its key
    for table in tables:
        out += _render_table(table, pending)
    return "\n".join(out).rstrip() + "\n"


def reference_tables(root: type[Section], variants: Variants | None = None) -> list[Table]:
    """Every table of the reference, depth-first in field order, the root's own keys first."""
    description = f"Keys at the top of the config. Declared in `{_qualname(root)}`"
    return list(_section_tables(root, "", "Top-level keys", "", description, variants or {}, depth=2))


def reference_keys(root: type[Section], variants: Variants | None = None) -> list[str]:
    """Every dotted key the reference lists (a key shared by several variants once per variant)."""
    return [row.key for table in reference_tables(root, variants) for row in table.rows]


def _section_tables(
    cls: type[Section], path: str, title: str, variant: str, description: str, variants: Variants, depth: int
) -> Iterator[Table]:
    """`cls`'s own keys as one table, then each nested section's (a variant label follows nested titles)."""
    rows: list[Row] = []
    nested: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{path}.{f.name}" if path else f.name
        tp = hints[f.name]
        if key in variants or _section_in(tp) is not None:
            nested.append((key, _one_line(f), tp))
        else:
            rows.append(Row(key, type_name(tp), _default(cls, f.name), _declared_in(cls, f.name), _one_line(f)))
    yield Table(title, path, description, rows, depth)
    # The root's sections are headings of the root table's level; deeper ones nest below their parent.
    inner_depth = depth + 1 if path else depth
    for key, help_line, tp in nested:
        if key in variants:
            yield from _variant_tables(key, help_line, variants, inner_depth)
            continue
        inner, shape = _section_in(tp)  # type: ignore[misc]
        inner_path = key + shape
        inner_title = f"{inner_path} ({variant})" if variant else inner_path
        text = f"{help_line}{_nullable(tp)}. Declared in `{_qualname(inner)}`"
        yield from _section_tables(inner, inner_path, inner_title, variant, text, variants, inner_depth)


def _variant_tables(key: str, help_line: str, variants: Variants, depth: int) -> Iterator[Table]:
    """A heading for the field, then one table per distinct class chosen by its `name` (names that share a
    class share a table)."""
    by_class: dict[type[Section], list[str]] = {}
    for name, cls in variants[key].items():
        by_class.setdefault(cls, []).append(name)
    group = key.rsplit(".", 1)[-1]
    choices = ", ".join(f"`{group}={name}`" for name in variants[key])
    text = f"{help_line}. Its keys depend on `{key}.name`, which the chosen config file sets: {choices}"
    yield Table(key, key, text, [], depth)
    for cls, names in by_class.items():
        label = ", ".join(f"{group}={name}" for name in names)
        doc = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        description = f"{doc.rstrip('.') + '. ' if doc else ''}Declared in `{_qualname(cls)}`"
        yield from _section_tables(cls, key, label, label, description, variants, depth + 1)


def _section_in(tp: Any) -> tuple[type[Section], str] | None:
    """The section class a field holds and how its keys continue the path: `` (a section or null),
    `.<name>` (a mapping of sections), `[]` (a list of sections)."""
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _section_in(members[0])
        return None
    if origin is dict and len(args) == 2:
        inner = _section_in(args[1])
        return (inner[0], ".<name>" + inner[1]) if inner else None
    if origin is list and len(args) == 1:
        inner = _section_in(args[0])
        return (inner[0], "[]" + inner[1]) if inner else None
    return None


def _nullable(tp: Any) -> str:
    args = typing.get_args(tp)
    return "; or null" if type(None) in args else ""


def _declared_in(cls: type, name: str) -> str:
    """The module of the class that declares field `name` (a base class for an inherited key)."""
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            return klass.__module__
    return cls.__module__


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _one_line(f: dataclasses.Field[Any]) -> str:
    return " ".join(str(f.metadata.get("help", "")).split())


def _default(cls: type, name: str) -> str | None:
    value = default_of(cls, name)
    return None if value is dataclasses.MISSING else format_value(value)


def format_value(value: Any) -> str:
    """A value as it is written on the command line or in YAML (null, true, 2e-4, [q_proj, v_proj], {})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, str):
        return value if value and _reads_back(value) else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return format_value(dataclasses.asdict(value))  # type: ignore[arg-type]
    return str(value)


def _float(value: float) -> str:
    """A float as YAML reads it back: 1.0e-05 (YAML 1.1 reads 1e-05 as a string), .inf, .nan."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    if "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def _reads_back(text: str) -> bool:
    """Whether YAML reads `text`, unquoted, back as the same string."""
    if any(c in text for c in ",[]{}#|"):
        return False
    try:
        return bool(yaml.safe_load(text) == text)
    except yaml.YAMLError:
        return False


def _contents(tables: list[Table]) -> list[str]:
    return [f"{'  ' * (table.depth - 2)}- [{_heading(table)}](#{_anchor(table.title)})" for table in tables]


def _heading(table: Table) -> str:
    """The title with its dotted path as code (a `<name>` in it would read as an HTML tag otherwise)."""
    path = table.path
    if path and (table.title == path or table.title.startswith(path + " (")):
        return f"`{path}`{table.title[len(path) :]}"
    return table.title


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _render_table(table: Table, notes: dict[str, str]) -> list[str]:
    """The table's heading, description, rows, then the notes on its keys (taken out of `notes`)."""
    out = [f"{'#' * min(table.depth, 6)} {_heading(table)}", "", table.description.rstrip(".") + ".", ""]
    if table.rows:
        out += ["| key | type | default | owner | meaning |", "|---|---|---|---|---|"]
        out += [
            f"| `{row.key}` | {_cell(row.type)} | {_default_cell(row.default)} | `{row.owner}` | {_cell(row.help)} |"
            for row in table.rows
        ]
        out.append("")
    for key in [table.path, *(row.key for row in table.rows)]:
        if key in notes:
            out += [notes.pop(key), ""]
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_cell(default: str | None) -> str:
    return "*required*" if default is None else f"`{_cell(default)}`"

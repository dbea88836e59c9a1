"""Typed config sections: a dataclass per section, read once from Hydra's composed config.

Each section is a `Section` subclass (a dataclass) next to the code that owns it (models/config.py, training/config.py,
adapters/*, tasks, evaluation/config.py); `parse(cls, mapping, prefix, problems)` builds it from the plain
mapping Hydra composed, checking every key against the field types:

* an unknown key names the closest known ones and lists them all;
* a wrong type names the key, the expected type and the value given;
* a `Literal[...]` field names the choices;
* every problem goes into one list (the caller raises one ConfigError), and a field with a bad value keeps
  its default, so that checks across fields (`Section.check`) still run without repeating the problem.

Each default lives in its field; the YAML files under `mora_train/configs` only restate the ones a user
sees first. A field's `help` (one line of meaning) is what the generated config reference prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union

from typing_extensions import dataclass_transform  # typing's from Python 3.11 on

S = TypeVar("S", bound="Section")
_MISSING: Any = dataclasses.MISSING


def setting(*, default: Any = _MISSING, help: str, factory: Callable[[], Any] | None = None) -> Any:  # noqa: A002
    """One config key: its default (or a factory for mutable ones) and one line saying what it means."""
    metadata = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass_transform(kw_only_default=True, field_specifiers=(setting, dataclasses.field))
class Section:
    """Base of every typed config section: each subclass is a keyword-only dataclass whose fields are its keys."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(kw_only=True)(cls)

    # True: keys that are not fields are ignored rather than refused (a section already reported as unknown).
    ignores_other_keys: ClassVar[bool] = False

    def check(self, prefix: str) -> list[str]:
        """Problems across this section's fields (each field's own type is checked by `parse`)."""
        return []

    @classmethod
    def field_variant(cls, key: str, value: Mapping[str, Any], problems: list[str]) -> type[Section] | None:
        """The section class of field `key` when it depends on the value (adapter.name, task.name); None: the
        field's declared type. Report an unknown variant in `problems` and return the declared type."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The section as plain values (nested sections as dicts), e.g. for resolved_config.yaml or a checkpoint."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a section class."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def type_name(tp: Any) -> str:
    """How a message names a type: int, float, str, bool, null, list of str, a mapping, one of a, b."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    if tp is float:
        return "a number"
    if origin is Literal:
        return "one of " + ", ".join("null" if a is None else str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "a list" if item is Any else f"a list of {type_name(item)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, Section):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Invalid(Exception):
    """A value that does not fit a type; the message is complete (the key and the value are in it)."""


SCALARS = (type(None), bool, int, float, str)
NO_FIT = object()  # what fit_scalar returns for a value that does not fit (None is a value that fits null)


def fit_scalar(tp: Any, value: Any) -> Any:
    """`value` as scalar type `tp` (one of SCALARS), or NO_FIT. bool is not an int here (YAML's true is no step
    count) and an int is a float (YAML's 1 for 1.0)."""
    if tp is type(None):
        return None if value is None else NO_FIT
    if tp is bool or tp is str:
        return value if isinstance(value, tp) else NO_FIT
    if isinstance(value, bool):
        return NO_FIT
    if tp is int:
        return value if isinstance(value, int) else NO_FIT
    return float(value) if isinstance(value, (int, float)) else NO_FIT


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """`value` as type `tp`, or _Invalid with the message; nested sections report their own problems."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp in SCALARS:
        fitted = fit_scalar(tp, value)
        if fitted is not NO_FIT:
            return fitted
    elif origin is Literal:
        choices = typing.get_args(tp)
        if any(value == choice and type(value) is type(choice) for choice in choices):
            return value
        names = ", ".join("null" if c is None else str(c) for c in choices)
        raise _Invalid(f"`{key}={value}` is unknown; use one of {names}")
    elif origin in (Union, types.UnionType):
        return _convert_union(tp, value, key, problems)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp) or (Any,)
            return [_convert(item, element, f"{key}[{i}]", problems) for i, element in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            args = typing.get_args(tp)
            item = args[1] if args else Any
            return {str(k): _convert(item, v, f"{key}.{k}", problems) for k, v in value.items()}
    elif isinstance(tp, type) and issubclass(tp, Section):
        if isinstance(value, Mapping):
            return parse(tp, value, key, problems)
    else:
        raise TypeError(f"config field {key} has a type the schema cannot check: {tp!r}")
    raise _Invalid(f"`{key}` must be {type_name(tp)}, got {value!r}")


def _convert_union(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    args = typing.get_args(tp)
    # A None value matches Optional first; otherwise the first member whose shape fits (a mapping -> section).
    for arg in sorted(args, key=lambda a: a is not type(None)):
        try:
            attempt: list[str] = []
            converted = _convert(arg, value, key, attempt)
        except _Invalid:
            continue
        problems.extend(attempt)
        return converted
    literal_choices = [c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    if literal_choices and isinstance(value, str):
        others = [type_name(a) for a in args if typing.get_origin(a) is not Literal and a is not type(None)]
        nullable = type(None) in args
        names = ", ".join(str(c) for c in literal_choices) + (", null" if nullable else "")
        extra = f" (or {' or '.join(others)})" if others else ""
        raise _Invalid(f"`{key}={value}` is unknown; use one of {names}{extra}")
    raise _Invalid(f"`{key}` must be {type_name(tp)}, got {value!r}")


def closest(name: str, known: list[str]) -> str:
    """' (did you mean X?)' when a known name is close to `name`, else ''."""
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""


def unknown_key(key: str, known: list[str]) -> str:
    name = key.rsplit(".", 1)[-1]
    return f"`{key}` is not a known key{closest(name, known)}; known keys: {', '.join(sorted(known))}"


def unknown_top_level_key(root: type, key: str) -> str:
    """A top-level key nothing reads (Hydra accepts `+key=value`): where a key of that name lives, if anywhere."""
    known = sorted(f.name for f in dataclasses.fields(root))
    homes = [path for path in key_paths(root) if path.rsplit(".", 1)[-1] == key and "." in path]
    hint = f"; did you mean {' or '.join(homes)}?" if homes else closest(key, known)
    return (
        f"`{key}` is not a key mora-train reads (added with +{key}=...?){hint} "
        f"The top-level keys are {', '.join(known)}"
    )


def key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a section class and of the sections nested in it."""
    paths = []
    for name, tp in field_types(cls).items():
        path = f"{prefix}{name}"
        paths.append(path)
        nested = [t for t in (tp, *typing.get_args(tp)) if isinstance(t, type) and issubclass(t, Section)]
        for section_type in nested[:1]:
            paths += key_paths(section_type, f"{path}.")
    return paths


def parse(cls: type[S], data: Mapping[str, Any] | None, prefix: str, problems: list[str]) -> S:
    """Build section `cls` from a plain mapping; every problem goes into `problems` (none is raised)."""
    hints = field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    given = dict(data or {})
    for key, value in given.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            if not cls.ignores_other_keys:
                problems.append(unknown_key(full, known) if prefix else unknown_top_level_key(cls, str(key)))
            continue
        variant = cls.field_variant(key, value, problems) if isinstance(value, Mapping) else None
        try:
            values[key] = _convert(variant or hints[key], value, full, problems)
        except _Invalid as invalid:
            problems.append(str(invalid))
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in values and f.default is _MISSING and f.default_factory is _MISSING
    ]
    for key in missing:
        # A required key that is absent or invalid: report it when absent, and fill a neutral value so that
        # checks across fields can run.
        if key not in given:
            problems.append(f"`{prefix}.{key}` is not set; {field_help(cls, key)}")
        values[key] = None
    instance = cls(**values)
    problems.extend(instance.check(prefix))
    return instance


def field_help(cls: type, key: str) -> str:
    """A field's one line of meaning."""
    for f in dataclasses.fields(cls):
        if f.name == key:
            return str(f.metadata.get("help", ""))
    return ""


def default_of(cls: type, key: str) -> Any:
    """A field's default value (a fresh one for a factory default), or dataclasses.MISSING for a required key."""
    for f in dataclasses.fields(cls):
        if f.name == key:
            if f.default is not _MISSING:
                return f.default
            factory: Any = f.default_factory  # dataclasses types it as a union with its MISSING marker
            return factory() if factory is not _MISSING else _MISSING
    return _MISSING

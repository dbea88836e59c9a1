"""Config values against transformers' type annotations (TrainingArguments fields, scheduler arguments): whether a
value fits, converted as transformers expects it, and how a message names the expected type."""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from mora_train.config.schema import NO_FIT, SCALARS, closest, fit_scalar, type_name


class Mismatch(Exception):
    """A value that does not fit an annotation."""


def union_members(tp: Any, none_first: bool = True) -> list[Any]:
    """The members of a union, null first (to match a None value first) or last (to name them); `SomeEnum |
    str` means "SomeEnum or one of its string values" (transformers converts the string in __post_init__),
    so the str member is dropped when an enum is a member."""
    members = list(typing.get_args(tp))
    if any(is_enum(m) for m in members):
        members = [m for m in members if m is not str]
    return sorted(members, key=lambda m: (m is type(None)) != none_first)


def is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def fit_annotation(tp: Any, value: Any) -> Any:
    """`value` converted to annotation `tp`, or Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any or isinstance(tp, (typing.TypeVar, str)):
        return value
    if tp in SCALARS:
        fitted = fit_scalar(tp, value)
        if fitted is not NO_FIT:
            return fitted
    elif is_enum(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and value in {member.value for member in tp}:
            return value  # TrainingArguments turns the string into the member itself
    elif origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp)):
            return value
    elif origin in (Union, types.UnionType):
        for member in union_members(tp):
            try:
                return fit_annotation(member, value)
            except Mismatch:
                continue
    elif origin in (list, Sequence) or tp is list:
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            (item,) = typing.get_args(tp) or (Any,)
            return [fit_annotation(item, element) for element in value]
    elif origin in (dict, Mapping) or tp is dict:
        if isinstance(value, Mapping):
            args = typing.get_args(tp)
            item = args[1] if args else Any
            return {k: fit_annotation(item, v) for k, v in value.items()}
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # an annotation this check does not know: TrainingArguments itself will judge
    raise Mismatch


def expected_type(tp: Any) -> str:
    """How a message names annotation `tp` (enums by their values)."""
    origin = typing.get_origin(tp)
    if is_enum(tp):
        return "one of " + ", ".join(str(member.value) for member in tp)
    if origin in (Union, types.UnionType):
        return " or ".join(expected_type(member) for member in union_members(tp, none_first=False))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "a list" if item is Any else f"a list of {expected_type(item)}"
    if isinstance(tp, type) and not typing.get_args(tp) and tp.__module__ != "builtins":
        return f"a {tp.__name__} object (it cannot come from a config file)"
    return type_name(tp)


def enum_hint(tp: Any, value: Any) -> str:
    """' (did you mean X?)' for a string close to one of the enum values `tp` takes."""
    if not isinstance(value, str):
        return ""
    enums = [tp] if is_enum(tp) else [m for m in typing.get_args(tp) if is_enum(m)]
    values = [str(member.value) for e in enums for member in e]
    return closest(value, values) if values else ""

"""Command-line overrides as Hydra reads them: parse one, and write one that reads back as the value given.

A printed command (the one that resumes a run, the one that finishes a sweep) must paste as it is: Hydra reads
`,` as a sweep, `=`, brackets and parentheses as grammar, so a value holding them is single-quoted for Hydra,
and the whole argument then quoted for the shell.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

# A value Hydra could not tell from grammar (the key's own `=`, sweeps, lists, dicts, functions, quotes,
# interpolations, spaces that the shell would split) is quoted; a plain path or number is left as it is.
_PLAIN = re.compile(r"[\w./:@%+~-]+")
_BACKSLASHES_BEFORE_QUOTE_OR_END = re.compile(r"(\\+)(?='|$)")


def hydra_value(value: str) -> str:
    """`value` written so that Hydra's override parser reads back exactly `value` (a string)."""
    if _PLAIN.fullmatch(value) and parsed_value(f"k={value}") == value:
        return value
    # Inside Hydra's quotes only backslashes right before a quote (or the closing one) are escapes: double
    # those, then escape the quotes themselves.
    escaped = _BACKSLASHES_BEFORE_QUOTE_OR_END.sub(lambda match: match.group(1) * 2, value).replace("'", "\\'")
    return f"'{escaped}'"


def hydra_override(key: str, value: str) -> str:
    """`key=value` as one Hydra override."""
    return f"{key}={hydra_value(value)}"


def shell_override(key: str, value: str) -> str:
    """`key=value` as one shell argument that Hydra reads back as `value`: paste-able into a command line."""
    return shell_quote(hydra_override(key, value))


def paste_command(arguments: list[str], pinned_key: str, pinned_value: str, dropped: tuple[str, ...] = ()) -> str:
    """`mora-train ARGUMENTS pinned_key=pinned_value`, each argument shell-quoted, leaving out the arguments that
    set `pinned_key` or a key in `dropped`: a command printed for the user to paste as it is."""
    left_out = {pinned_key, *dropped}
    kept = [a for a in arguments if a.split("=", 1)[0].lstrip("+~") not in left_out]
    return " ".join(["mora-train", *(shell_quote(a) for a in kept), shell_override(pinned_key, pinned_value)])


def shell_quote(argument: str) -> str:
    """`argument` quoted for a POSIX shell: as it is when safe, else in double quotes when nothing in it is
    special there (easier to read around Hydra's single quotes), else as shlex quotes it."""
    if shlex.quote(argument) == argument:
        return argument
    if not set(argument) & set('"$`\\!'):
        return f'"{argument}"'
    return shlex.quote(argument)


def parse_override(text: str) -> Any:
    """Hydra's reading of one command-line override (hydra.core.override_parser Override), or None when it
    is not one (a flag, the value of a flag such as --config-dir, or something Hydra cannot parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if text.startswith("-"):
        return None
    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException:
        return None


def parsed_value(text: str) -> Any:
    """The value of a one-value override `key=value` as Hydra reads it; None when it is no such override."""
    override = parse_override(text)
    if override is None or override.is_sweep_override() or override.is_delete():
        return None
    return override.value()


# Config mappings whose keys are the user's to choose (TrainingArguments fields, a scheduler's arguments): the
# shipped config holds them empty, so Hydra would want `+` before every key under them.
OPEN_MAPPINGS = ("trainer.hf", "trainer.lr_scheduler_kwargs")
_KEY_UNDER_OPEN_MAPPING = re.compile(r"(" + "|".join(re.escape(m) for m in OPEN_MAPPINGS) + r")\.[\w.]+=")


def open_mapping_overrides(arguments: list[str]) -> list[str]:
    """`trainer.hf.KEY=V` and `trainer.lr_scheduler_kwargs.KEY=V` as `++KEY=V` (add, or set when a config file
    already set it), so that keys under the open mappings need no `+`; every other argument as it is."""
    return [f"++{argument}" if _KEY_UNDER_OPEN_MAPPING.match(argument) else argument for argument in arguments]

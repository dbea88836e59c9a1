"""What Hydra refuses before the job starts, as mora-train errors: one paragraph, the fix, exit 2.

Hydra prints its own composition errors (an unknown key, an unknown option of a config group, an override it
cannot parse) and exits 1, the code of a bug. With HYDRA_FULL_ERROR=1 it raises them instead: `hydra_errors_raised`
sets that for the length of `hydra.main`, and `hydra_error_problem` turns what comes out into a MoraTrainError
naming the argument and the fix (the group's options, the closest key names, the `+key=` form, quoting).
A user who sets HYDRA_FULL_ERROR=1 gets Hydra's full traceback, as Hydra documents.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mora_train.config.overrides import shell_override, shell_quote
from mora_train.configs import CONFIG_DIR
from mora_train.core.errors import MoraTrainError

FULL_ERROR = "HYDRA_FULL_ERROR"
# Marks a HYDRA_FULL_ERROR=1 that mora-train set (and the processes it starts inherit), not the user.
SET_BY_MORA_TRAIN = "MORA_TRAIN_SET_HYDRA_FULL_ERROR"

QUOTING = (
    "A value holding spaces or any of , = [ ] ( ) { } ' \" is quoted for both the shell and Hydra, e.g. "
    "\"output_dir='/data/my run,v2'\" (a value with spaces alone also works as 'output_dir=/data/my run')"
)
LISTING = "mora-train --help lists the config groups and their options; mora-train --cfg job prints every key"


def user_wants_full_error() -> bool:
    return os.environ.get(FULL_ERROR) == "1" and os.environ.get(SET_BY_MORA_TRAIN) != "1"


@contextmanager
def hydra_errors_raised() -> Iterator[bool]:
    """While Hydra runs: its errors raised to the caller (True), unless the user asked for Hydra's own report."""
    if user_wants_full_error():
        yield False
        return
    os.environ[FULL_ERROR] = os.environ[SET_BY_MORA_TRAIN] = "1"
    try:
        yield True
    finally:
        os.environ.pop(FULL_ERROR, None)
        os.environ.pop(SET_BY_MORA_TRAIN, None)


@contextmanager
def user_environment() -> Iterator[None]:
    """While the job runs: the environment as the user set it, which the processes the job starts inherit."""
    ours = os.environ.get(SET_BY_MORA_TRAIN) == "1"
    if ours:
        os.environ.pop(FULL_ERROR, None)
        os.environ.pop(SET_BY_MORA_TRAIN, None)
    try:
        yield
    finally:
        if ours:
            os.environ[FULL_ERROR] = os.environ[SET_BY_MORA_TRAIN] = "1"


def one_paragraph(text: str) -> str:
    """Hydra's multi-line message as one line: the search-path listing and the doc link left out."""
    text = text.split("\nConfig search path:", maxsplit=1)[0].split("\nSearch path:", maxsplit=1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("See https://")]
    return " ".join(lines).rstrip(".")


def hydra_error_problem(err: BaseException, argv: list[str]) -> MoraTrainError | None:
    """The user's mistake behind an exception that came out of `hydra.main`, or None when it is not one (a bug)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(err, MoraTrainError):
        return err
    if isinstance(err, OverrideParseException):
        return MoraTrainError(_unparsable(err, argv))
    if isinstance(err, MissingConfigException):
        return MoraTrainError(_missing_option(err, argv))
    if isinstance(err, HydraException) and isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)):
        return MoraTrainError(_unknown_key(err.__cause__, argv))
    if isinstance(err, HydraException):
        return MoraTrainError(_other_hydra_error(err, argv))
    if isinstance(err, OmegaConfBaseException):
        return MoraTrainError(f"the config cannot be resolved: {one_paragraph(str(err))}. {LISTING}")
    if isinstance(err, OSError) and _raised_creating_a_folder_in_hydra(err):
        return MoraTrainError(
            f"cannot create the run folder {err.filename} ({err.strerror or err}); choose a writable location with "
            "output_dir=... (hydra.sweep.dir=... for mora-train -m)"
        )
    if isinstance(err, ValueError) and _innermost_module(err).startswith("hydra."):
        return MoraTrainError(f"{err} (see mora-train --help)")  # Hydra's own flags used together wrongly
    return None


def _frames(err: BaseException) -> list[tuple[str, str]]:
    """(module, function) of each frame the exception passed, outermost first."""
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append((str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    return frames


def _innermost_module(err: BaseException) -> str:
    frames = _frames(err)
    return frames[-1][0] if frames else ""


def _raised_creating_a_folder_in_hydra(err: OSError) -> bool:
    """Hydra creating the run (or sweep) folder: hydra.core.utils.run_job or a sweeper calls mkdir."""
    frames = _frames(err)
    return bool(frames) and frames[-1][1] in ("mkdir", "makedirs") and any(m.startswith("hydra.") for m, _ in frames)


def _last_argument(argv: list[str], key: str) -> str | None:
    """The last command-line override of `key` (also as +key=, ++key=, ~key), as typed."""
    found = None
    for arg in argv:
        name = re.split(r"[=@]", arg, maxsplit=1)[0].lstrip("+~")
        if name == key:
            found = arg
    return found


def _unparsable(err: Any, argv: list[str]) -> str:
    override = str(getattr(err, "override", "") or "")
    reason = one_paragraph(str(getattr(err, "message", "") or err)).removeprefix(
        f"Error parsing override '{override}' "
    )
    text = f"cannot read the command-line argument {override!r}: {reason}."
    position = argv.index(override) if override in argv else -1
    previous = argv[position - 1] if position > 0 else ""
    if "=" not in override and "=" in previous and not previous.startswith("-"):
        whole = shell_quote(f"{previous} {override}")
        return (
            f"{text} Every argument is key=value (or a flag such as -m or --cfg job); {override!r} looks like the "
            f"rest of {previous!r}, a value with a space that the shell split in two. Quote the whole argument: {whole}"
        )
    return f"{text} Write each override as key=value. {QUOTING}"


def _missing_option(err: Any, argv: list[str]) -> str:
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, name = missing.rpartition("/")
    if not group:  # the primary config (--config-name) itself
        return f"{one_paragraph(str(err))}; check --config-name and --config-dir. {LISTING}"
    options = list(getattr(err, "options", None) or _shipped_options(group))
    argument = _last_argument(argv, group) or f"{group}={name}"
    text = f"{argument}: there is no {group} config named {name!r}"
    where = re.match(r"In '([^']+)'", str(err))
    if where and where.group(1) != "config" and _last_argument(argv, group) is None:
        text += f" (asked for by {where.group(1)})"
    if not options:
        return f"{text}. {LISTING}"
    closest = difflib.get_close_matches(name, options, n=1)
    suggestion = f" (did you mean {group}={closest[0]}?)" if closest else ""
    return (
        f"{text}; the options of {group} are: {', '.join(options)}{suggestion}. Pick one with {group}=NAME, or "
        f"add {group}/{name}.yaml in a folder of yours and pass --config-dir FOLDER "
        '(docs/configuration.md, "Your own configs")'
    )


def _shipped_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml")) if (CONFIG_DIR / group).is_dir() else []


def _unknown_key(cause: Any, argv: list[str]) -> str:
    full_key = str(cause.full_key or cause.key)
    parent, _, name = full_key.rpartition(".")
    argument = _last_argument(argv, full_key) or full_key
    section = f"`{parent}`" if parent else "the config"
    choice = _last_argument(argv, parent.split(".")[0]) if parent else None
    if choice and "." not in parent and "=" in choice:
        section = choice  # adapter=lora: the option the user picked has no such key
    known = [str(key) for key in (cause.parent_node.keys() if cause.parent_node is not None else [])]
    text = f"{argument}: {section} has no key {name!r}" + (f" (its keys: {', '.join(known)})" if known else "")
    owners = _options_with_key(parent.split(".")[0], full_key) if parent else []
    if owners:
        text += f"; {full_key} is a key of {', '.join(owners)}: pick one of those"
    closest = _closest_keys(cause.parent_node, full_key)
    if closest:
        text += f". Did you mean {' or '.join(closest)}?"
    added = shell_quote("+" + argument.lstrip("+")) if "=" in argument else f"+{full_key}=VALUE"
    return (
        f"{text}{'' if closest else '.'} Hydra adds a key the config does not have only with a leading +, e.g. "
        f"{added}: for a key that is read without being listed (distributed.deepspeed_overrides.*), not for a "
        f"misspelt one, which validation then refuses. {LISTING}"
    )


def _closest_keys(parent_node: Any, full_key: str) -> list[str]:
    """Known dotted keys close to `full_key`: by the whole key, else by its last part anywhere in the config."""
    if parent_node is None:
        return []
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(parent_node._get_root(), resolve=False, throw_on_missing=False)
    paths = [path for path in _dotted_keys(tree) if not path.startswith("hydra.") or full_key.startswith("hydra.")]
    closest = difflib.get_close_matches(full_key, paths, n=2, cutoff=0.75)
    if not closest:
        name = full_key.rpartition(".")[2]
        leaves = {path.rpartition(".")[2]: path for path in paths}
        closest = [leaves[leaf] for leaf in difflib.get_close_matches(name, list(leaves), n=2, cutoff=0.75)]
    return closest


def _dotted_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            yield path
            yield from _dotted_keys(value, path + ".")


def _options_with_key(group: str, full_key: str) -> list[str]:
    """The shipped options of `group` whose config has `full_key` (adapter.mora_type: adapter=mora, ...)."""
    from omegaconf import OmegaConf

    inner = full_key.split(".", 1)[1]
    owners = []
    for option in _shipped_options(group):
        try:
            if OmegaConf.select(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"), inner) is not None:
                owners.append(f"{group}={option}")
        except Exception:  # noqa: BLE001 - a config that does not load has no key to offer
            continue
    return owners


def _other_hydra_error(err: BaseException, argv: list[str]) -> str:
    text = one_paragraph(str(err))
    ambiguous = re.match(r"Ambiguous value for argument '([^=']+)=(.*)'", str(err))
    if ambiguous:  # a value with a comma outside -m: Hydra reads a sweep
        key, value = ambiguous.groups()
        return (
            f"{key}={value}: Hydra reads a value with ',' as a sweep, which needs -m. For one value, quote it: "
            f"{shell_override(key, value)}; for a list: {key}=[...]; to sweep: add -m"
        )
    no_match = re.match(r"Could not override '([^']+)'\. No match in the defaults list", str(err))
    if no_match:  # a group that the defaults list does not name (sweep=..., a group of --config-dir)
        argument = _last_argument(argv, no_match.group(1)) or no_match.group(1)
        return (
            f"{argument}: {no_match.group(1)} is not in the config's defaults list, so it cannot be overridden; "
            f"add it with a leading +: {shell_quote('+' + argument.lstrip('+'))}"
        )
    return f"{text}. {LISTING}"

"""Every command the README and docs/*.md show in a bash block works as written, so a newcomer can paste it:

* `mora-train` and `mora-train-eval` command lines compose with Hydra (tests/conftest.compose_config, after the
  CLI's own rewriting of the arguments) and the composed config reads into the typed sections without a problem;
  a multirun (`-m`) composes once for every combination of its comma-separated values (the grid a `+sweep=` file
  holds itself is tests/unit/test_configs.py's).
* `scripts/launch.sh` lines run with `--print` (its flags parse and it prints the `accelerate launch` command,
  starting nothing), and the mora-train arguments of that command compose as above; so do those of
  `accelerate launch ... -m mora_train ARGS` lines (accelerate's own flags are not checked).
* The other console scripts (mora-train-export, -generate, -report, -spectrum) parse their arguments with their
  own argparse parser; nothing runs (the paths they name need not exist).
* `mora-train --help` prints Hydra's help.

Not checked: the files and folders the commands name (run dirs, checkpoints, adapters need not exist here);
what a command does once its arguments are accepted (other tests train, export, report); accelerate's own flags
on `accelerate launch` lines; command lines with an argument of SKIPPED_ARGUMENTS (the reason is in the skip);
the programs that are not ours (pip, python, bash, wandb, vllm, ...). Links between the pages
are checked too: every relative link names a file that exists and, with `#anchor`, a heading of that file.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mora_train.config.overrides import open_mapping_overrides
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HYDRA_PROGRAMS = {"mora-train": [], "mora-train-eval": ["mode=eval"]}  # program -> what it puts before the args

# Arguments that make a command line uncheckable here, and why.
SKIPPED_ARGUMENTS = {
    "--config-dir": "needs the user's config folder that the page writes first; "
    "tests/integration/test_run_dirs_and_user_configs.py runs that example",
    "hydra.searchpath=": "the same example with the folder on Hydra's search path (tested there too)",
}
# What is taken out of a command line before composing, and why that is sound.
DROPPED_TOKENS = {
    "...": "stands for 'the rest of the line above' (the QLoRA line after the QMoRA one)",
}
MAX_SWEEP_JOBS = 16


@dataclass(frozen=True)
class Shown:
    """One command line shown in a page: where, the program, and its arguments."""

    page: str
    line: int
    program: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.program} {shlex.join(self.args)}"


def _bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every ```bash block: continuation lines joined, heredoc bodies left out."""
    out: list[tuple[int, str]] = []
    in_block, heredoc_end, pending, start = False, None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not in_block:
            in_block = line.strip() == "```bash"
            continue
        if line.strip() == "```":
            in_block = False
            continue
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", logical)
        heredoc_end = heredoc.group(1) if heredoc else None
        out.append((start, logical))
    return out


def _simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at `&&`, `||`, `;`, `|`), comments and redirections removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        elif token in {">", ">>", "<"}:
            i += 1  # the redirection's target
        else:
            commands[-1].append(token)
        i += 1
    return [command for command in commands if command]


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(our program, its arguments), or None for a program that is not ours. Leading VAR=value assignments are
    the shell's; `accelerate launch ... -m mora_train ARGS` and `accelerate launch $(which mora-train) ARGS`
    are mora-train with ARGS."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    name = Path(tokens[0]).name
    if name in HYDRA_PROGRAMS or name in _console_scripts() or tokens[0] == "scripts/launch.sh":
        return (tokens[0] if tokens[0] == "scripts/launch.sh" else name), tokens[1:]
    if tokens[:2] == ["accelerate", "launch"]:
        for i, token in enumerate(tokens):
            if token == "-m" and tokens[i + 1 : i + 2] == ["mora_train"]:
                return "mora-train", tokens[i + 2 :]
            if token.startswith("$(which") and tokens[i + 1 : i + 2] == ["mora-train)"]:
                return "mora-train", tokens[i + 2 :]
        raise AssertionError(f"an `accelerate launch` line that starts no mora_train: {shlex.join(tokens)}")
    return None


@functools.cache
def _console_scripts() -> dict[str, str]:
    """pyproject's [project.scripts]: name -> "module:function" (read from the file, not the installed metadata,
    which an editable install leaves stale when an entry point moves)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, flags=re.MULTILINE))


def shown_commands() -> list[Shown]:
    found = []
    for path in PAGES:
        for number, line in _bash_lines(path):
            for tokens in _simple_commands(line):
                program = _program(tokens)
                if program:
                    found.append(Shown(str(path.relative_to(ROOT)), number, program[0], tuple(program[1])))
    return found


SHOWN = shown_commands()


def _ids(commands: list[Shown]) -> list[str]:
    return [f"{c.page}:{c.line}" for c in commands]


def _skip_reason(args: tuple[str, ...]) -> str | None:
    for arg in args:
        for prefix, reason in SKIPPED_ARGUMENTS.items():
            if arg.startswith(prefix):
                return reason
    return None


def _hydra_jobs(args: list[str]) -> list[list[str]]:
    """The override lists a command line's job(s) compose: one for a single run; for a multirun (`-m`), one for
    every combination of its comma-separated values. `--cfg job|hydra|all` only prints the composed config:
    composing is what it checks."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = "-m" in args or "--multirun" in args
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in {"-m", "--multirun"} or arg in DROPPED_TOKENS:
            i += 1
            continue
        if arg in {"--cfg", "-c"}:
            i += 2
            continue
        assert not arg.startswith("-"), f"a flag this test does not know: {arg} (handle it here)"
        overrides.append(arg)
        i += 1
    overrides = open_mapping_overrides(overrides)  # as the CLI does before Hydra sees them
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override() else [text]
        for o, text in zip(parsed, overrides, strict=True)
    ]
    jobs = [list(job) for job in itertools.product(*choices)]
    assert len(jobs) <= MAX_SWEEP_JOBS, f"{len(jobs)} jobs: raise MAX_SWEEP_JOBS if a page really shows that many"
    return jobs


_COMPOSED: set[tuple[str, ...]] = set()  # the README's tour repeats lines of the pages: compose each once


def _check_composes(overrides: list[str]) -> None:
    """Composes, and reads into the typed sections with no problem but the paths the line names: run dirs,
    checkpoints and model folders of the examples need not exist here."""
    from mora_train.pipeline.run_config import read_run_config

    if tuple(overrides) in _COMPOSED:
        return
    _, problems = read_run_config(compose_config(overrides))
    assert [p for p in problems if not any(p.startswith(f"`{arg}` does not exist") for arg in overrides)] == []
    _COMPOSED.add(tuple(overrides))


HYDRA_SHOWN = [c for c in SHOWN if c.program in HYDRA_PROGRAMS and not {"--help", "-h"} & set(c.args)]


@pytest.mark.parametrize("shown", HYDRA_SHOWN, ids=_ids(HYDRA_SHOWN))
def test_hydra_command_composes(shown: Shown) -> None:
    reason = _skip_reason(shown.args)
    if reason:
        pytest.skip(f"{shown}: {reason}")
    for overrides in _hydra_jobs(HYDRA_PROGRAMS[shown.program] + list(shown.args)):
        try:
            _check_composes(overrides)
        except Exception as err:
            raise AssertionError(f"{shown}\n  composed as {overrides}: {err}") from err


LAUNCH_SHOWN = [c for c in SHOWN if c.program == "scripts/launch.sh"]


@pytest.mark.parametrize("shown", LAUNCH_SHOWN, ids=_ids(LAUNCH_SHOWN))
def test_launch_script_line_parses_and_composes(shown: Shown) -> None:
    args = [a for a in shown.args if a != "--print"]
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts/launch.sh"), "--print", *args], capture_output=True, text=True, check=False
    )
    assert printed.returncode == 0, f"{shown}: {printed.stderr}"
    launch = shlex.split(printed.stdout)
    at = launch.index("mora_train")
    assert launch[at - 1] == "-m", printed.stdout
    for overrides in _hydra_jobs(launch[at + 1 :]):
        _check_composes(overrides)


ARGPARSE_SHOWN = [c for c in SHOWN if c.program in _console_scripts() and c.program not in HYDRA_PROGRAMS]


class _Parsed(Exception):
    """Raised in place of running the command once its parser has accepted the arguments."""


@pytest.mark.parametrize("shown", ARGPARSE_SHOWN, ids=_ids(ARGPARSE_SHOWN))
def test_console_script_arguments_parse(shown: Shown, monkeypatch: pytest.MonkeyPatch) -> None:
    module, function = _console_scripts()[shown.program].split(":")
    main = getattr(importlib.import_module(module), function)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parse_args(parser, args, namespace)  # exits 2 with argparse's message when the page's line is wrong
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(list(shown.args))
    except SystemExit as exit_:
        raise AssertionError(f"{shown}: its parser refused the arguments (exit {exit_.code})") from None
    except _Parsed:
        return
    raise AssertionError(f"{shown}: {module}.{function} returned without parsing its arguments with argparse")


HELP_SHOWN = [c for c in SHOWN if c.program in HYDRA_PROGRAMS and {"--help", "-h"} & set(c.args)]


@pytest.mark.parametrize("shown", HELP_SHOWN, ids=_ids(HELP_SHOWN))
def test_help_prints(shown: Shown, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mora_train.cli.train import main

    monkeypatch.setattr("sys.argv", [shown.program, *shown.args])
    with pytest.raises(SystemExit) as exit_:
        main()  # Hydra prints the help and exits
    assert exit_.value.code in (None, 0)
    assert "== Config groups" in capsys.readouterr().out


def test_every_kind_of_command_is_found() -> None:
    """The extraction itself: the pages show commands of every kind this module checks (an empty list would
    make the tests above pass while checking nothing)."""
    programs = {c.program for c in SHOWN}
    assert {"mora-train", "scripts/launch.sh"} <= programs
    assert set(_console_scripts()) - {"mora-train-eval"} <= programs
    assert len(HYDRA_SHOWN) >= 40 and any("-m" in c.args for c in HYDRA_SHOWN) and HELP_SHOWN


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_links_between_pages_resolve() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []

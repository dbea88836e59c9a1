"""Typed data sections of a task: where its records come from (`task.data`, each source a `DataSource`), the
keys every data-backed recipe shares, and the multiple-choice benchmarks (`task.benchmarks.NAME`).

A source is a mapping (in YAML):

    path: data/train.jsonl              # a file, a glob (data/*.jsonl, data/**/*.parquet), a folder, or a list of them
    hub: openai/gsm8k                   # or a Hub dataset id: datasets.load_dataset(hub, hub_config, split=split)
    hub_config: main
    split: train
    revision: null
    fields: {question: question}        # optional: overrides the task's data.fields for this source
    keep_if_in: {field: pubid, file: ids.json}   # optional: keep records whose field is a key/item/line of `file`
    drop_if_in: {field: pubid, file: ids.json}   # optional: drop them instead
    limit: 100                          # optional: the first N records only
    text_unit: file                     # .txt files: one record per file | line | paragraph (blank-line separated)
    weight: 3                           # optional, training sources: this source's share of the mix

A bare string is short for `{path: STRING}`; a list of sources is read in order and concatenated, or, when every
source has a `weight`, interleaved at random in those proportions (`task.data.mixing_stop` says when the mix ends).

Each source's own keys are checked when it is parsed; what reading it needs (exactly one of path or hub, the
files there, a split for the hub) is checked by `source_problems` for the sources a run reads, so that a
benchmark left out of task.eval.benchmarks may name data this machine does not have.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from mora_train.config.schema import Section, parse, setting
from mora_train.data.paths import expand_path, missing_path_message

TooLong = Literal["truncate", "drop"]
MixingStop = Literal["first_exhausted", "all_exhausted"]


class IdFilter(Section):
    """keep_if_in / drop_if_in: records whose field is (or is not) one of a file's ids."""

    field: str = setting(help="the record field holding the id: a name or a dotted path")
    file: str = setting(help="the ids: a JSON object's keys, a JSON array's items, or a text file's lines")


class DataSource(Section):
    """One source of records: local files or a Hugging Face Hub dataset."""

    path: str | list[str] | None = setting(
        default=None, help="local files: a file, a glob, a folder, or a list of them"
    )
    hub: str | None = setting(default=None, help="a Hugging Face Hub dataset id such as openai/gsm8k (instead of path)")
    hub_config: str | None = setting(default=None, help="the hub dataset's config name (hub only)")
    split: str | None = setting(
        default=None, help="the hub dataset's split, slices included: train, test, train[:1000]"
    )
    revision: str | None = setting(default=None, help="the hub dataset's revision: a branch, tag or commit (hub only)")
    fields: dict[str, str | None] | None = setting(
        default=None, help="this source's own field mapping, over task.data.fields"
    )
    keep_if_in: IdFilter | None = setting(default=None, help="keep only the records whose field is an id of a file")
    drop_if_in: IdFilter | None = setting(default=None, help="drop the records whose field is an id of a file")
    limit: int | None = setting(default=None, help="the first N records only (after filters; null: all)")
    text_unit: Literal["file", "line", "paragraph"] = setting(
        default="file", help=".txt files: one record per file, line or paragraph (blank-line separated)"
    )
    weight: float | None = setting(
        default=None,
        help="training sources only: this source's share of the mix (every source weighted: interleaved at random "
        "in these proportions; null: sources read in order)",
    )

    def check(self, prefix: str) -> list[str]:
        problems = []
        if self.limit is not None and self.limit < 1:
            problems.append(f"`{prefix}.limit={self.limit}` must be a positive integer or null")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            problems.append(
                f"`{prefix}.weight={self.weight}` must be a positive number (its share of the mix; a source that "
                "should not be read is left out of the list instead)"
            )
        return problems

    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return self.path if isinstance(self.path, list) else [self.path]

    def files(self) -> list[Path]:
        """The local files the source reads, in order."""
        return [f for p in self.paths() for f in expand_path(p)]

    def filters(self) -> list[tuple[str, IdFilter]]:
        """(key, filter) of each id filter set: keep_if_in, then drop_if_in."""
        return [(key, spec) for key, spec in (("keep_if_in", self.keep_if_in), ("drop_if_in", self.drop_if_in)) if spec]

    def read_problems(self, where: str) -> list[str]:
        """What would stop reading this source, found without reading any data (missing files included)."""
        problems = []
        if (self.path is None) == (self.hub is None):
            problems.append(
                f"`{where}` needs exactly one of `path` (local files) or `hub` (a Hugging Face dataset id); "
                f"got path={self.path!r}, hub={self.hub!r}. To switch to the hub: {where}.path=null "
                f"{where}.hub=org/name"
            )
        problems += [missing_path_message(f"{where}.path", p) for p in self.paths() if not expand_path(p)]
        if self.hub is not None and self.split is None:
            problems.append(f"`{where}.split` must be set for a hub dataset (e.g. {where}.split=train)")
        for key, spec in self.filters():
            if not Path(spec.file).expanduser().is_file():
                problems.append(missing_path_message(f"{where}.{key}.file", spec.file, folders=False))
        return problems


# `task.data.train` and the like: one source, a path, or a list of them.
Sources = DataSource | str | list[DataSource | str]


def resolve_sources(spec: Any, key: str) -> tuple[list[DataSource], list[str]]:
    """The sources of `spec` (a DataSource, a path, a plain mapping, or a list of them) and every problem found
    without reading any data. A DataSource was checked when it was parsed; plain mappings are parsed here."""
    if spec is None:
        unset = f"`{key}` is not set; give a file path (`{key}=path/to/data.jsonl`) or a hub id (`{key}.hub=org/name`)"
        return [], [unset]
    is_list = isinstance(spec, Sequence) and not isinstance(spec, str)
    if is_list and not spec:
        return [], [f"`{key}` is an empty list; give at least one source"]
    sources: list[DataSource] = []
    problems: list[str] = []
    for i, item in enumerate(spec if is_list else [spec]):
        where = f"{key}[{i}]" if is_list else key
        if isinstance(item, str):
            source = DataSource(path=item)
        elif isinstance(item, DataSource):
            source = item
        elif isinstance(item, Mapping):
            source = parse(DataSource, item, where, problems)
        else:
            problems.append(f"`{where}` must be a path or a mapping with `path` or `hub`, got {item!r}")
            continue
        problems += source.read_problems(where)
        sources.append(source)
    return sources, problems


def source_problems(spec: Any, key: str) -> list[str]:
    """Config problems of a source spec, found without reading any data (missing files included)."""
    return resolve_sources(spec, key)[1]


def source_weights(sources: Sequence[DataSource]) -> list[float] | None:
    """The mixing weights of a list of sources (every one weighted: valid, see weight_problems), or None when the
    sources are read in order."""
    weights = [s.weight for s in sources]
    if len(sources) < 2 or any(w is None for w in weights):
        return None
    return [float(w) for w in weights if w is not None]


def weight_problems(spec: Any, key: str, mixed: bool) -> list[str]:
    """Weights mix the sources of one list: every source of it weighted, or none. `mixed`: this key may mix (the
    training sources); elsewhere (held-out data, benchmarks) a weight is refused."""
    sources, _ = resolve_sources(spec, key)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    is_list = isinstance(spec, Sequence) and not isinstance(spec, str)
    if not weighted:
        return []
    if not mixed:
        return [f"`{key}` has a `weight`, which only mixes training sources (task.data.train); remove it"]
    if len(sources) == 1:
        where = f"{key}[0]" if is_list else key
        single = (
            f"`{where}.weight` is set but `{key}` has a single source: a weight mixes several sources; remove it or "
            f"list more sources ({key}=[{{path: a.jsonl, weight: 3}}, {{path: b.jsonl, weight: 1}}])"
        )
        return [single]
    if len(weighted) < len(sources):
        unweighted = ", ".join(f"{key}[{i}]" for i in range(len(sources)) if i not in weighted)
        partial = (
            f"`{key}`: {unweighted} {'has' if ',' not in unweighted else 'have'} no `weight` while other sources "
            "have one; give every source a weight (mixed at random in those proportions) or none (read in order)"
        )
        return [partial]
    return []


def fields_problems(fields: Mapping[str, str | None], key: str, required: Sequence[str] = ()) -> list[str]:
    """Each recipe field the recipe needs must be mapped to a field of the data."""
    return [
        f"`{key}.{name}` is missing; map it to the field of your data that holds it"
        for name in required
        if fields.get(name) is None
    ]


def template_fields(template: str) -> list[str]:
    """The field names a template fills; ValueError when it is malformed."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def template_problems(template: str, key: str, allowed: set[str], needed: str) -> list[str]:
    """A recipe template (`key`) must be valid, fill `needed` and use only the fields in `allowed`."""
    try:
        names = set(template_fields(template))
    except ValueError as err:
        return [f"`{key}={template!r}` is not a valid template ({err}); write literal braces as {{{{ }}}}"]
    problems = []
    if needed not in names:
        problems.append(f"`{key}={template!r}` must contain {{{needed}}}")
    if names - allowed:
        problems.append(f"`{key}` uses unknown fields {sorted(names - allowed)}; it can use {sorted(allowed)}")
    return problems


class TaskData(Section):
    """task.data: the training and held-out sources, and how the recipe's fields map to your data's."""

    train: Sources | None = setting(default=None, help="the training records: a source, a path, or a list of them")
    eval: Sources | None = setting(default=None, help="the held-out records the task's evaluation reads")
    fields: dict[str, str | None] = setting(
        factory=dict, help='recipe field -> your field: a name, a dotted path (a.b.0) or a template ("{a} {b}")'
    )
    mixing_stop: MixingStop = setting(
        default="first_exhausted",
        help="weighted training sources: the mix ends when the first source runs out (first_exhausted), or when "
        "every source has been read once, the others starting over meanwhile (all_exhausted)",
    )
    mixing_seed: int = setting(default=0, help="seed of the weighted sources' random interleaving")

    def required_fields(self) -> tuple[str, ...]:
        """The recipe fields every record must give."""
        return ()

    def check(self, prefix: str) -> list[str]:
        return [
            *source_problems(self.train, f"{prefix}.train"),
            *source_problems(self.eval, f"{prefix}.eval"),
            *weight_problems(self.train, f"{prefix}.train", mixed=True),
            *weight_problems(self.eval, f"{prefix}.eval", mixed=False),
            *fields_problems(self.fields, f"{prefix}.fields", self.required_fields()),
        ]


def default_cache_dir() -> str:
    """$MORA_TRAIN_CACHE/datasets, or ~/.cache/mora-train/datasets (as the shipped task configs say)."""
    return os.environ.get("MORA_TRAIN_CACHE", "~/.cache/mora-train") + "/datasets"


class DataRecipe(Section):
    """The keys every data-backed recipe shares (gsm8k, metamath, instruction, pretrain, biomed, finance)."""

    name: str = setting(help="the task (chosen by task=NAME)")
    data: TaskData = setting(help="the training and held-out sources and the field mapping")
    too_long: TooLong = setting(
        default="truncate", help="examples longer than trainer.max_seq_len: truncate them from the end, or drop them"
    )
    cache_dir: str | None = setting(
        factory=default_cache_dir,
        help="datasets' cache of the data read and tokenized (Arrow files, found again by fingerprint: tokenizer, "
        "recipe, max_seq_len and data); null: a temporary folder, removed at exit",
    )
    num_proc: int | None = setting(
        default=None, help="processes that tokenize the training data (datasets' map num_proc); null or 1: this one"
    )

    def check(self, prefix: str) -> list[str]:
        if self.num_proc is not None and self.num_proc < 1:
            return [f"`{prefix}.num_proc={self.num_proc}` must be a positive integer or null (tokenize in-process)"]
        return []

    def streams(self) -> bool:
        """Whether the training data is read as a stream (task.data.streaming, where the recipe has it)."""
        return False

    def step_budget_problems(self, max_steps: int, prefix: str, max_steps_key: str) -> list[str]:
        """A stream has no length, so the number of steps cannot come from epochs: trainer.max_steps must say it."""
        if self.streams() and max_steps <= 0:
            unbounded = (
                f"`{prefix}.data.streaming=true` reads the training data as a stream of unknown length, so "
                f"`{max_steps_key}={max_steps}` (epochs) cannot say when training ends; set {max_steps_key} to a "
                f"positive number of steps, or {prefix}.data.streaming=false"
            )
            return [unbounded]
        return []


class BenchmarkSettings(Section):
    """task.benchmarks.NAME: a zero-shot multiple-choice benchmark, scored by option log-likelihood.

    Its data is checked only when task.eval.benchmarks selects it (a benchmark may name files this machine lacks).
    """

    data: Sources | None = setting(
        default=None, help="its records: a source (path/hub, filters, limit) or a list of them"
    )
    prompt: str = setting(help='a template over the record\'s fields: "Question: {question}\\nA. {A}\\n...\\nAnswer:"')
    choices: list[str] = setting(help='one continuation per option, templates too: [" A", " B"] or [" {A}", " {B}"]')
    label_field: str = setting(help="the record field holding the gold label")
    labels: list[str | int | float | bool] = setting(
        help="the label value of each choice, in order (compared as strings)"
    )
    score: Literal["sum", "mean"] = setting(
        default="sum", help="sum of the option's token log-probs, or mean (per token)"
    )
    max_samples: int | None = setting(default=None, help="the first N records (null: all)")
    sample_seed: int | None = setting(
        default=None,
        help="N records drawn at random with this seed instead (file order kept), for files grouped by label",
    )

    def check(self, prefix: str) -> list[str]:
        problems = []
        choices = self.choices
        if choices is not None and (len(choices) < 2 or not all(choices)):
            problems.append(f"`{prefix}.choices` must be a list of at least two non-empty strings, got {choices!r}")
        if self.labels is not None and choices is not None and len(self.labels) != len(choices):
            problems.append(f"`{prefix}.labels` must be a list with one label per choice, got {self.labels!r}")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"`{prefix}.max_samples={self.max_samples}` must be a positive integer or null (all)")
        for name, template in [("prompt", self.prompt), *((f"choices[{i}]", c) for i, c in enumerate(choices or []))]:
            if template is not None:
                try:
                    template_fields(template)
                except ValueError as err:
                    problems.append(
                        f"`{prefix}.{name}={template!r}` is not a valid template ({err}); write braces as {{{{ }}}}"
                    )
        return problems

"""EleutherAI's lm-evaluation-harness as an evaluation backend (`eval.backend=lm_eval`, or `both`).

The model and tokenizer already loaded by the pipeline (a finished run's merged model, a checkpoint, an
adapter merged into its base) are wrapped in lm-eval's `HFLM` and scored by `lm_eval.simple_evaluate` on
`eval.lm_eval.tasks`. The tasks are lm-eval task YAML files: the ones shipped in `configs/lm_eval/`
(GSM8K, PubMedQA, the medical MMLU subjects; lm-eval's own prompts and metrics) and any folders of the
user's in `eval.lm_eval.include_path`. They read local files only (`dataset_path: json`), named in
`dataset_kwargs.data_files` relative to `eval.lm_eval.data_dir` (default: `data_dir`, MORA_TRAIN_DATA):
before a run the task files are copied into RUN_DIR/lm_eval/tasks/ with those paths made absolute
(`write_task_dirs`), and only that folder is indexed (lm-eval's built-in tasks, which read the Hugging Face
Hub, are not), so the evaluation runs offline and the run dir records exactly what was evaluated.

lm-eval is an optional dependency (`pip install 'mora-train[lm-eval]'`): it is imported only to evaluate,
and `config_problems` reports its absence (with every other problem of the config) before a model is loaded.
The settings are `LmEvalConfig` (evaluation/config.py), which checks each key on its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mora_train.configs import CONFIG_DIR
from mora_train.core.run_dir import RunDir
from mora_train.evaluation.config import EvalConfig, LmEvalConfig

log = logging.getLogger(__name__)

SHIPPED_TASK_DIR = CONFIG_DIR / "lm_eval"
INSTALL_HINT = "pip install 'mora-train[lm-eval]' (or pip install 'lm-eval>=0.4'; scripts/setup.sh installs it)"


# -- task files: read without lm-eval (validation), written with resolved data paths (evaluation) ---------


class FunctionRef(str):
    """A `!function module.name` value of a task file, kept as written (lm-eval resolves it)."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


def _function_ref(loader: _TaskLoader, node: yaml.ScalarNode) -> FunctionRef:
    # Typed ScalarNode for construct_scalar; another node under the tag makes it raise PyYAML's ConstructorError.
    return FunctionRef(loader.construct_scalar(node))


_TaskLoader.add_constructor("!function", _function_ref)
_TaskDumper.add_representer(FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
# Prompts with newlines stay one readable line ("Question: {{question}}\nAnswer:"), as in the shipped files.
_TaskDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None),
)


def is_task_file(path: Path) -> bool:
    """lm-eval's task files end in .yaml; files they `include:` may be named `..._yaml` (not indexed)."""
    return path.is_file() and path.name.endswith("yaml") and "__pycache__" not in path.parts


def read_task_file(path: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """One task file as lm-eval reads it: its `include:` files merged under its own keys."""
    path = path.resolve()
    if path in _seen:
        raise ValueError(f"include cycle at {path}")
    cfg = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader with one extra tag
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds no mapping")
    includes = cfg.pop("include", None)
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes or []:
        merged.update(read_task_file(path.parent / include, _seen | {path}))
    merged.update(cfg)
    return merged


@dataclass
class TaskIndex:
    """Task, group and tag names of some task folders -> what each needs (member tasks, data files)."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> merged config
    groups: dict[str, list[str]] = field(default_factory=dict)  # name -> member names
    tags: dict[str, list[str]] = field(default_factory=dict)  # name -> member task names
    unreadable: list[str] = field(default_factory=list)  # files that are not valid YAML

    @property
    def names(self) -> list[str]:
        return sorted({*self.tasks, *self.groups, *self.tags})

    def members(self, name: str, _seen: frozenset[str] = frozenset()) -> list[str]:
        """The leaf tasks behind a task, group or tag name (unknown names yield nothing)."""
        if name in self.tasks:
            return [name]
        if name in _seen:
            return []
        children = self.groups.get(name) or self.tags.get(name) or []
        return [leaf for child in children for leaf in self.members(child, _seen | {name})]


def index_tasks(folders: list[Path]) -> TaskIndex:
    """Every task, group and tag defined by the task files under `folders` (later folders win, as in lm-eval)."""
    index = TaskIndex()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*.yaml") if is_task_file(p)):
            try:
                cfg = read_task_file(path)
            except (OSError, ValueError, yaml.YAMLError) as err:
                index.unreadable.append(
                    f"{path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                )
                continue
            if "group" in cfg:
                entries = cfg.get("task") or []
                index.groups[str(cfg["group"])] = [
                    str(e.get("task") if isinstance(e, dict) else e)
                    for e in (entries if isinstance(entries, list) else [entries])
                ]
            elif "task" in cfg:
                name = str(cfg["task"])
                index.tasks[name] = cfg
                tags = cfg.get("tag") or []
                for tag in [tags] if isinstance(tags, str) else tags:
                    index.tags.setdefault(str(tag), []).append(name)
    return index


def data_file_paths(data_files: Any) -> list[str]:
    """The paths of a `dataset_kwargs.data_files` value: a path, a list, or split -> path(s)."""
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for value in data_files.values() for p in data_file_paths(value)]
    if isinstance(data_files, (list, tuple)):
        return [p for value in data_files for p in data_file_paths(value)]
    return []


def resolve_data_files(data_files: Any, data_dir: str | None) -> Any:
    """data_files with every relative path joined to data_dir (absolute paths and globs' roots kept)."""
    if isinstance(data_files, str):
        if os.path.isabs(os.path.expanduser(data_files)) or data_dir is None:
            return os.path.expanduser(data_files)
        return os.path.join(os.path.expanduser(data_dir), data_files)
    if isinstance(data_files, dict):
        return {split: resolve_data_files(value, data_dir) for split, value in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [resolve_data_files(value, data_dir) for value in data_files]
    return data_files


def task_folders(lm: LmEvalConfig) -> list[Path]:
    """The shipped task folder, then the user's eval.lm_eval.include_path folders (theirs win on a name clash)."""
    return [SHIPPED_TASK_DIR, *(Path(p).expanduser() for p in lm.include_path or [])]


def write_task_dirs(lm: LmEvalConfig, dest: Path) -> list[Path]:
    """Copy each task folder into dest/ with its data_files resolved against eval.lm_eval.data_dir.

    Returns the copies, in task_folders order, for lm-eval's TaskManager(include_path=...). Other files
    (`!function` helpers next to a user's task files) are copied unchanged."""
    shutil.rmtree(dest, ignore_errors=True)
    written = []
    for number, folder in enumerate(task_folders(lm)):
        copy = dest / ("shipped" if number == 0 else f"include_{number}_{folder.name}")
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
        for path in sorted(p for p in copy.rglob("*") if is_task_file(p)):
            cfg = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 - see read_task_file
            kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
            if isinstance(kwargs, dict) and "data_files" in kwargs:
                kwargs["data_files"] = resolve_data_files(kwargs["data_files"], lm.data_dir)
                path.write_text(
                    f"# {folder / path.relative_to(copy)} with data_files under {lm.data_dir}\n"
                    + yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=1000)
                )
        written.append(copy)
    return written


# -- config checks (pipeline.validate collects them with every other problem) ------------------------------
# Each key's type and range is checked by EvalConfig / LmEvalConfig (evaluation/config.py); these need more:
# the installed harness, the file system, the task files.

# An example of eval.lm_eval.tasks in the message of an empty list: the shipped tasks nearest the training task.
SUGGESTED_TASKS = {"gsm8k": "gsm8k", "metamath": "gsm8k", "biomed": "pubmedqa,mmlu_medical"}


def config_problems(eval_cfg: EvalConfig, task_name: str | None = None) -> list[str]:
    """Problems of eval.lm_eval that its section alone cannot see, when the harness runs (eval.backend=lm_eval
    or both): lm-eval installed, the include_path folders, the task names and their data files. `task_name`
    (the training task) picks the example of an empty eval.lm_eval.tasks."""
    if not eval_cfg.runs_lm_eval:
        return []
    lm = eval_cfg.lm_eval
    problems: list[str] = []
    if importlib.util.find_spec("lm_eval") is None:
        problems.append(
            f"`eval.backend` runs lm-evaluation-harness, which is not installed: {INSTALL_HINT}; "
            "or use eval.backend=task"
        )
    missing = [p for p in lm.include_path or [] if not Path(p).expanduser().is_dir()]
    if missing:
        problems.append(
            f"`eval.lm_eval.include_path` names folders that do not exist: {', '.join(missing)}; give "
            "folders of lm-eval task YAML files"
        )
        return problems  # the task names cannot be looked up without those folders
    return problems + _task_problems(lm, SUGGESTED_TASKS.get(task_name or "", "gsm8k"))


def _task_problems(lm: LmEvalConfig, example: str) -> list[str]:
    index = index_tasks(task_folders(lm))
    shipped = ", ".join(index_tasks([SHIPPED_TASK_DIR]).names)
    if not lm.tasks:
        return [
            (
                f"`eval.lm_eval.tasks` is empty; name the lm-eval tasks to run, e.g. eval.lm_eval.tasks=[{example}] "
                f"(shipped: {shipped}; more from your own task folders with eval.lm_eval.include_path=[DIR])"
            )
        ]
    problems = [f"`eval.lm_eval.include_path`: cannot read {bad}" for bad in index.unreadable]
    unknown = [t for t in lm.tasks if t not in index.names]
    if unknown:
        where = " and your eval.lm_eval.include_path folders" if lm.include_path else ""
        problems.append(
            f"`eval.lm_eval.tasks` names unknown lm-eval tasks: {', '.join(unknown)}; the shipped tasks are {shipped} "
            f"(configs/lm_eval/){where}. Only these are indexed (lm-eval's built-in tasks read the Hugging Face Hub); "
            "add your own task YAML folder with eval.lm_eval.include_path=[DIR]"
        )
    return problems + _data_file_problems(lm, index)


def _data_file_problems(lm: LmEvalConfig, index: TaskIndex) -> list[str]:
    """The data files the named tasks read: relative ones need eval.lm_eval.data_dir, and each must exist."""
    needed: dict[str, list[str]] = {}
    for name in lm.tasks or []:
        for leaf in index.members(name):
            kwargs = index.tasks[leaf].get("dataset_kwargs") or {}
            for path in data_file_paths(kwargs.get("data_files") if isinstance(kwargs, dict) else None):
                needed.setdefault(path, []).append(leaf)
    relative = sorted(
        {leaf for path, leaves in needed.items() if not os.path.isabs(os.path.expanduser(path)) for leaf in leaves}
    )
    if relative and lm.data_dir is None:
        return [
            (
                f"`eval.lm_eval.data_dir` is null, and the lm-eval tasks {', '.join(relative)} read their data files "
                "relative to it (e.g. gsm8k/test.jsonl); set data_dir=/path/to/data (or MORA_TRAIN_DATA, or "
                "eval.lm_eval.data_dir=...)"
            )
        ]
    missing = []
    for path, leaves in needed.items():
        resolved = resolve_data_files(path, lm.data_dir)
        if not any(ch in resolved for ch in "*?[") and not Path(resolved).exists():
            missing.append(f"{resolved} (task {leaves[0]})")
    if missing:
        return [
            (
                f"lm-eval task data files do not exist: {'; '.join(missing)}; set eval.lm_eval.data_dir (default: "
                "data_dir) to the folder holding them"
            )
        ]
    return []


# -- evaluation ---------------------------------------------------------------------------------------------


def pubmedqa_test_split(dataset: Any) -> Any:
    """`process_docs` of the shipped pubmedqa task: the official 500-question test split of PQA-L."""
    ids = json.loads((CONFIG_DIR / "data" / "pubmedqa" / "test_ground_truth.json").read_text())
    return dataset.filter(lambda doc: str(doc["pubid"]) in ids)


def settings(lm: LmEvalConfig) -> dict[str, Any]:
    """The harness settings recorded in metrics.json (eval.lm_eval.*, resolved)."""
    return lm.to_dict()


def evaluate(lm: LmEvalConfig, model: Any, tokenizer: Any, run_dir: Path) -> dict[str, Any]:
    """Score the model with lm-evaluation-harness on eval.lm_eval.tasks; the `lm_eval` section of metrics.json.

    Writes RUN_DIR/lm_eval/: tasks/ (the task files as evaluated), results.json (the harness's own record:
    configs, versions, n-shot, environment) and, with log_samples, samples_TASK.jsonl (one line per
    document and filter: prompt, response, filtered answer, target, metrics)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    run = RunDir(run_dir)
    folders = write_task_dirs(lm, run.lm_eval / "tasks")
    # The already-loaded model and tokenizer: what the pipeline evaluates (a merged run, a checkpoint, an
    # adapter merged into its base), on the device it is on. Only the copied task folders are indexed.
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm.batch_size)
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    started = time.time()
    results = lm_eval.simple_evaluate(
        model=harness_model,
        tasks=list(lm.tasks or []),
        task_manager=manager,
        num_fewshot=lm.num_fewshot,
        limit=lm.limit,
        gen_kwargs={"max_gen_toks": lm.max_gen_toks} if lm.max_gen_toks else None,
        log_samples=lm.log_samples,
    )
    runtime = time.time() - started
    samples = results.pop("samples", None) or {}
    for task, docs in samples.items():
        with open(run.lm_eval_samples(task), "w") as f:
            f.writelines(json.dumps(doc, default=str, ensure_ascii=False) + "\n" for doc in docs)
    run.lm_eval_results.write_text(json.dumps(results, default=str, indent=1, ensure_ascii=False))
    return {
        "version": lm_eval.__version__,
        "settings": settings(lm),
        # task or group -> lm-eval's metric names (`exact_match,strict-match`: metric,filter) -> value; stderr
        # where lm-eval computed one; its labels and counts left out (n_samples below)
        "results": {
            task: {k: v for k, v in metrics.items() if _is_number(v) and k != "sample_len"}
            for task, metrics in results["results"].items()
        },
        "higher_is_better": results.get("higher_is_better", {}),
        "n_shot": results.get("n-shot", {}),
        "n_samples": {task: counts.get("effective") for task, counts in results.get("n-samples", {}).items()},
        "runtime_s": runtime,
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def primary(section: dict[str, Any], tasks: list[str]) -> tuple[str, bool]:
    """The metric a run with eval.backend=lm_eval is ranked by: the first named task's first metric
    (lm-eval's order: gsm8k's `exact_match,strict-match`, pubmedqa's `acc,none`), as `lm_eval/TASK/METRIC`,
    and its direction."""
    for task in tasks:
        for metric, value in section["results"].get(task, {}).items():
            if "_stderr" not in metric and _is_number(value):
                base = metric.split(",", 1)[0]
                greater = section.get("higher_is_better", {}).get(task, {}).get(base, True)
                return f"lm_eval/{task}/{metric}", bool(greater)
    raise ValueError(f"lm-evaluation-harness returned no metric for {tasks}")

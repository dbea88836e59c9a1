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
and `config_problems` reports its absence (with every other problem of `eval.*`) before a model is loaded.
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
from omegaconf import DictConfig, OmegaConf

from mora_train.configs import CONFIG_DIR

log = logging.getLogger(__name__)

SHIPPED_TASK_DIR = CONFIG_DIR / "lm_eval"
BACKENDS = ("task", "lm_eval", "both")
INSTALL_HINT = "pip install 'mora-train[lm-eval]' (or pip install 'lm-eval>=0.4'; scripts/setup.sh installs it)"
# eval.lm_eval.* -> accepted Python types (bool is checked apart: it is an int in Python)
SCHEMA: dict[str, tuple[type, ...]] = {
    "tasks": (list, type(None)),
    "num_fewshot": (int, type(None)),
    "limit": (int, float, type(None)),
    "batch_size": (int, str),
    "max_gen_toks": (int, type(None)),
    "data_dir": (str, type(None)),
    "include_path": (list, type(None)),
    "log_samples": (bool,),
}


# -- task files: read without lm-eval (validation), written with resolved data paths (evaluation) ---------

class FunctionRef(str):
    """A `!function module.name` value of a task file, kept as written (lm-eval resolves it)."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_TaskDumper.add_representer(FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
# Prompts with newlines stay one readable line ("Question: {{question}}\nAnswer:"), as in the shipped files.
_TaskDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)
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
                index.unreadable.append(f"{path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
                continue
            if "group" in cfg:
                entries = cfg.get("task") or []
                index.groups[str(cfg["group"])] = [
                    str(e.get("task") if isinstance(e, dict) else e) for e in (entries if isinstance(entries, list) else [entries])
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


def task_folders(lm_cfg: Any) -> list[Path]:
    """The shipped task folder, then the user's eval.lm_eval.include_path folders (theirs win on a name clash)."""
    include = lm_cfg.get("include_path") if lm_cfg is not None else None
    return [SHIPPED_TASK_DIR, *(Path(str(p)).expanduser() for p in include or [])]


def write_task_dirs(lm_cfg: Any, dest: Path) -> list[Path]:
    """Copy each task folder into dest/ with its data_files resolved against eval.lm_eval.data_dir.

    Returns the copies, in task_folders order, for lm-eval's TaskManager(include_path=...). Other files
    (`!function` helpers next to a user's task files) are copied unchanged."""
    data_dir = lm_cfg.get("data_dir")
    shutil.rmtree(dest, ignore_errors=True)
    written = []
    for number, folder in enumerate(task_folders(lm_cfg)):
        copy = dest / ("shipped" if number == 0 else f"include_{number}_{folder.name}")
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
        for path in sorted(p for p in copy.rglob("*") if is_task_file(p)):
            cfg = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 - see read_task_file
            kwargs = cfg.get("dataset_kwargs") if isinstance(cfg, dict) else None
            if isinstance(kwargs, dict) and "data_files" in kwargs:
                kwargs["data_files"] = resolve_data_files(kwargs["data_files"], data_dir)
                path.write_text(
                    f"# {folder / path.relative_to(copy)} with data_files under {data_dir}\n"
                    + yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=1000)
                )
        written.append(copy)
    return written


# -- config checks (pipeline.validate collects them with every other problem) ------------------------------

def backend(cfg: DictConfig) -> str:
    """eval.backend, `task` when the config has no eval section."""
    eval_cfg = cfg.get("eval")
    return str(eval_cfg.get("backend", "task")) if isinstance(eval_cfg, DictConfig) else "task"


def config_problems(cfg: DictConfig) -> list[str]:
    """Problems of `eval.*`, each naming the key and the fix; the lm_eval keys are checked when the harness runs."""
    eval_cfg = cfg.get("eval")
    if eval_cfg is None:
        return []
    if not isinstance(eval_cfg, DictConfig):
        return [f"`eval` must be a mapping with a `backend` key, got {eval_cfg!r}"]
    problems: list[str] = []
    for key in sorted(set(eval_cfg) - {"backend", "lm_eval"}):
        problems.append(f"`eval.{key}` is not a known key; known keys: backend, lm_eval")
    chosen = eval_cfg.get("backend", "task")
    if chosen not in BACKENDS:
        problems.append(
            f"`eval.backend={chosen}` is unknown; use task (the task's own evaluation, task.eval.*), lm_eval "
            "(lm-evaluation-harness on eval.lm_eval.tasks) or both"
        )
    if chosen in ("lm_eval", "both"):
        problems += lm_eval_problems(eval_cfg.get("lm_eval"))
    return problems


def lm_eval_problems(lm_cfg: Any) -> list[str]:
    if not isinstance(lm_cfg, DictConfig):
        return [f"`eval.lm_eval` must be a mapping (tasks, num_fewshot, limit, ...), got {lm_cfg!r}"]
    problems: list[str] = []
    values = OmegaConf.to_container(lm_cfg, resolve=True)
    for key, value in values.items():
        if key not in SCHEMA:
            problems.append(f"`eval.lm_eval.{key}` is not a known key; known keys: {', '.join(sorted(SCHEMA))}")
        elif (isinstance(value, bool) and bool not in SCHEMA[key]) or not isinstance(value, SCHEMA[key]):
            types = " or ".join("null" if t is type(None) else t.__name__ for t in SCHEMA[key])
            example = {"tasks": " (in brackets: eval.lm_eval.tasks=[gsm8k,pubmedqa])",
                       "include_path": " of folders (eval.lm_eval.include_path=[/path/to/tasks])"}.get(key, "")
            problems.append(f"`eval.lm_eval.{key}` must be {types}{example}, got {value!r}")
    if importlib.util.find_spec("lm_eval") is None:
        problems.append(f"`eval.backend` runs lm-evaluation-harness, which is not installed: {INSTALL_HINT}; "
                        "or use eval.backend=task")
    problems += _number_problems(values)
    include = values.get("include_path")
    if include is not None and not isinstance(include, list):
        return problems  # its type problem is reported; the task names cannot be looked up without it
    missing = [str(p) for p in include or [] if not Path(str(p)).expanduser().is_dir()]
    if missing:
        problems.append(f"`eval.lm_eval.include_path` names folders that do not exist: {', '.join(missing)}; give "
                        "folders of lm-eval task YAML files")
        return problems
    problems += _task_problems(values, lm_cfg)
    return problems


def _number_problems(values: dict) -> list[str]:
    problems = []
    fewshot, limit, batch, gen = (values.get(k) for k in ("num_fewshot", "limit", "batch_size", "max_gen_toks"))
    if isinstance(fewshot, int) and not isinstance(fewshot, bool) and fewshot < 0:
        problems.append(f"`eval.lm_eval.num_fewshot={fewshot}` must be 0 or more (null: each task's own default)")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool):
        if isinstance(limit, float) and not 0 < limit <= 1:
            problems.append(f"`eval.lm_eval.limit={limit}` must be a whole number of documents per task or a share in (0, 1]")
        elif isinstance(limit, int) and limit < 1:
            problems.append(f"`eval.lm_eval.limit={limit}` must be at least 1 (null: every document)")
    if isinstance(batch, str) and not (batch == "auto" or batch.startswith("auto:")):
        problems.append(f"`eval.lm_eval.batch_size={batch}` must be a positive integer or auto (lm-eval finds the largest that fits)")
    elif isinstance(batch, int) and not isinstance(batch, bool) and batch < 1:
        problems.append(f"`eval.lm_eval.batch_size={batch}` must be at least 1")
    if isinstance(gen, int) and not isinstance(gen, bool) and gen < 1:
        problems.append(f"`eval.lm_eval.max_gen_toks={gen}` must be at least 1 (null: the task's own, else 256)")
    return problems


def _task_problems(values: dict, lm_cfg: Any) -> list[str]:
    tasks = values.get("tasks")
    index = index_tasks(task_folders(lm_cfg))
    shipped = ", ".join(index_tasks([SHIPPED_TASK_DIR]).names)
    if not tasks:
        return [f"`eval.lm_eval.tasks` is empty; name the lm-eval tasks to run, e.g. eval.lm_eval.tasks=[gsm8k] "
                f"(shipped: {shipped}; more from your own task folders with eval.lm_eval.include_path=[DIR])"]
    if not isinstance(tasks, list):
        return []  # the type problem is already reported
    problems = [f"`eval.lm_eval.include_path`: cannot read {bad}" for bad in index.unreadable]
    unknown = [str(t) for t in tasks if str(t) not in index.names]
    if unknown:
        where = " and your eval.lm_eval.include_path folders" if values.get("include_path") else ""
        problems.append(
            f"`eval.lm_eval.tasks` names unknown lm-eval tasks: {', '.join(unknown)}; the shipped tasks are {shipped} "
            f"(configs/lm_eval/){where}. Only these are indexed (lm-eval's built-in tasks read the Hugging Face Hub); "
            "add your own task YAML folder with eval.lm_eval.include_path=[DIR]"
        )
    data_dir = values.get("data_dir")
    needed: dict[str, list[str]] = {}
    for name in tasks:
        for leaf in index.members(str(name)):
            kwargs = index.tasks[leaf].get("dataset_kwargs") or {}
            for path in data_file_paths(kwargs.get("data_files") if isinstance(kwargs, dict) else None):
                needed.setdefault(path, []).append(leaf)
    relative = sorted({leaf for path, leaves in needed.items() if not os.path.isabs(os.path.expanduser(path)) for leaf in leaves})
    if relative and data_dir is None:
        problems.append(
            f"`eval.lm_eval.data_dir` is null, and the lm-eval tasks {', '.join(relative)} read their data files relative "
            "to it (e.g. gsm8k/test.jsonl); set data_dir=/path/to/data (or MORA_TRAIN_DATA, or eval.lm_eval.data_dir=...)"
        )
        return problems
    missing = []
    for path, leaves in needed.items():
        resolved = resolve_data_files(path, data_dir)
        if not any(ch in resolved for ch in "*?[") and not Path(resolved).exists():
            missing.append(f"{resolved} (task {leaves[0]})")
    if missing:
        problems.append(
            f"lm-eval task data files do not exist: {'; '.join(missing)}; set eval.lm_eval.data_dir (default: data_dir) "
            "to the folder holding them"
        )
    return problems


# -- evaluation ---------------------------------------------------------------------------------------------

def pubmedqa_test_split(dataset: Any) -> Any:
    """`process_docs` of the shipped pubmedqa task: the official 500-question test split of PQA-L."""
    ids = json.loads((CONFIG_DIR / "data" / "pubmedqa" / "test_ground_truth.json").read_text())
    return dataset.filter(lambda doc: str(doc["pubid"]) in ids)


def settings(lm_cfg: Any) -> dict[str, Any]:
    """The harness settings recorded in metrics.json (eval.lm_eval.*, resolved)."""
    values = OmegaConf.to_container(lm_cfg, resolve=True) if isinstance(lm_cfg, DictConfig) else dict(lm_cfg)
    return {key: values.get(key) for key in SCHEMA}


def evaluate(lm_cfg: Any, model: Any, tokenizer: Any, run_dir: Path) -> dict[str, Any]:
    """Score the model with lm-evaluation-harness on eval.lm_eval.tasks; the `lm_eval` section of metrics.json.

    Writes RUN_DIR/lm_eval/: tasks/ (the task files as evaluated), results.json (the harness's own record:
    configs, versions, n-shot, environment) and, with log_samples, samples_TASK.jsonl (one line per
    document and filter: prompt, response, filtered answer, target, metrics)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    config = settings(lm_cfg)
    out = Path(run_dir) / "lm_eval"
    folders = write_task_dirs(config, out / "tasks")
    # The already-loaded model and tokenizer: what the pipeline evaluates (a merged run, a checkpoint, an
    # adapter merged into its base), on the device it is on. Only the copied task folders are indexed.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config["batch_size"])
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    started = time.time()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(config["tasks"]),
        task_manager=manager,
        num_fewshot=config["num_fewshot"],
        limit=config["limit"],
        gen_kwargs={"max_gen_toks": config["max_gen_toks"]} if config["max_gen_toks"] else None,
        log_samples=bool(config["log_samples"]),
    )
    runtime = time.time() - started
    samples = results.pop("samples", None) or {}
    for task, docs in samples.items():
        with open(out / f"samples_{task}.jsonl", "w") as f:
            for doc in docs:
                f.write(json.dumps(doc, default=str, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(results, default=str, indent=1, ensure_ascii=False))
    return {
        "version": lm_eval.__version__,
        "settings": config,
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

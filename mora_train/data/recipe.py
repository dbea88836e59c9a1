"""Config checks shared by the data-backed task recipes (gsm8k, metamath, instruction, biomed, finance)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mora_train.data.common import TOO_LONG_POLICIES
from mora_train.data.sources import fields_problems, source_problems, template_fields


def check_template(task_cfg: DictConfig, key: str, allowed: set[str], needed: str, problems: list[str]) -> None:
    template = task_cfg.get(key)
    if not isinstance(template, str):
        problems.append(f"`task.{key}` must be a string, got {template!r}")
        return
    try:
        names = set(template_fields(template))
    except ValueError as err:
        problems.append(f"`task.{key}={template!r}` is not a valid template ({err}); write literal braces as {{{{ }}}}")
        return
    if needed not in names:
        problems.append(f"`task.{key}={template!r}` must contain {{{needed}}}")
    if names - allowed:
        problems.append(f"`task.{key}` uses unknown fields {sorted(names - allowed)}; it can use {sorted(allowed)}")


def check_eval_settings(eval_cfg: Any, problems: list[str], extra_ints: tuple[str, ...] = ()) -> None:
    if not isinstance(eval_cfg, DictConfig):
        problems.append("`task.eval` must be a mapping")
        return
    limit = eval_cfg.get("max_samples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        problems.append(f"`task.eval.max_samples={limit}` must be a positive integer or null (all)")
    for key in ("batch_size", *extra_ints):
        value = eval_cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"`task.eval.{key}={value}` must be a positive integer")


def common_problems(task_cfg: DictConfig, required_fields: tuple[str, ...]) -> list[str]:
    """Checks every data-backed recipe shares: sources, field mapping, too_long, cache_dir."""
    problems: list[str] = []
    data = task_cfg.get("data")
    if not isinstance(data, DictConfig):
        return ["`task.data` must be a mapping with `train` and `eval` sources"]
    problems += source_problems(data.get("train"), "task.data.train")
    problems += source_problems(data.get("eval"), "task.data.eval")
    problems += fields_problems(data.get("fields"), "task.data.fields", required_fields)
    if task_cfg.get("too_long") not in TOO_LONG_POLICIES:
        problems.append(f"`task.too_long={task_cfg.get('too_long')}` must be one of {', '.join(TOO_LONG_POLICIES)}")
    if task_cfg.get("cache_dir") is not None and not isinstance(task_cfg.get("cache_dir"), str):
        problems.append(f"`task.cache_dir` must be a folder path or null (no cache), got {task_cfg.get('cache_dir')!r}")
    return problems

"""Standalone evaluation (`mora-train mode=eval checkpoint=...`, or `mora-train-eval checkpoint=...`).

Evaluates, with the task's own evaluation config:
  - a run dir (uses RUN_DIR/merged, or RUN_DIR/adapter on top of model=... when there is no merged/),
  - a merged or any plain transformers model folder (has config.json),
  - an adapter folder (adapter_config.json: mora-train MoRA, peft LoRA, official MoRA fork) on top of model=...,
  - nothing (checkpoint=null): the base model of model=..., for baseline numbers.
Writes resolved_config.yaml, metrics.json and the task's prediction files into output_dir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mora_train.adapters import load_adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.pipeline.validate import validate
from mora_train.tasks import TASKS
from mora_train.core.errors import MoraTrainError
from mora_train.core.metrics import METRICS_JSON, make_record
from mora_train.core.io import write_json_atomically
from mora_train.models import DTYPES, load_model_and_tokenizer

log = logging.getLogger(__name__)


def _plain_model(path: Path, model_cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dtype = DTYPES[model_cfg.get("dtype") or "float32"]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=bool(model_cfg.trust_remote_code))
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(model_cfg.trust_remote_code))
    except (OSError, ValueError) as err:
        raise MoraTrainError(f"could not load a model and tokenizer from {path}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_checkpoint(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, what was loaded) for cfg.checkpoint, as described in the module docstring."""
    if cfg.get("checkpoint") is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        return model, tokenizer, "base model"
    path = Path(cfg.checkpoint).expanduser()
    if (path / "merged" / "config.json").is_file():
        path = path / "merged"
    elif (path / "adapter" / ADAPTER_CONFIG_NAME).is_file():
        path = path / "adapter"
    if (path / "config.json").is_file():
        model, tokenizer = _plain_model(path, cfg.model)
        return model, tokenizer, f"model folder {path}"
    if (path / ADAPTER_CONFIG_NAME).is_file():
        base, tokenizer = load_model_and_tokenizer(cfg.model)
        model = load_adapter(base, path).merge_and_unload()
        return model, tokenizer, f"adapter {path} merged into model={cfg.model.name_or_path or 'random init'}"
    raise MoraTrainError(
        f"`checkpoint={cfg.checkpoint}` is neither a run dir (with merged/ or adapter/), a model folder "
        f"(config.json) nor an adapter folder ({ADAPTER_CONFIG_NAME})"
    )


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate cfg.checkpoint on cfg.task; return the metrics written to metrics.json."""
    from mora_train.pipeline.train import prepare_run_dir

    started = time.time()
    validate(cfg)
    run_dir = prepare_run_dir(cfg)
    task = TASKS[cfg.task.name]
    model, tokenizer, loaded = load_checkpoint(cfg)
    if torch.cuda.is_available():
        model.to("cuda")
    log.info("evaluating %s on task %s", loaded, task.name)
    build = task.build_eval or task.build
    data = build(cfg.task, tokenizer, cfg.trainer.max_seq_len)
    eval_metrics = task.evaluate(cfg.task, model, tokenizer, data, run_dir)
    identity = {
        "mode": "eval",
        "task": task.name,
        "checkpoint": str(cfg.checkpoint) if cfg.get("checkpoint") else None,
        "evaluated": loaded,
    }
    metrics = make_record(
        identity, task.primary_metric, task.greater_is_better, eval_metrics, run={"wall_time_s": time.time() - started}
    )
    write_json_atomically(run_dir / METRICS_JSON, metrics)
    return metrics

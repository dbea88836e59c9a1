"""Standalone evaluation (`mora-train mode=eval checkpoint=...`, or `mora-train-eval checkpoint=...`).

Evaluates, with the task's own evaluation config and/or lm-evaluation-harness (eval.backend):
  - a run dir (uses RUN_DIR/merged, or RUN_DIR/adapter on top of model=... when there is no merged/),
  - a merged or any plain transformers model folder (has config.json),
  - an adapter folder (adapter_config.json: mora-train MoRA, peft LoRA, official MoRA fork) on top of model=...,
  - nothing (checkpoint=null): the base model of model=..., for baseline numbers.
Writes resolved_config.yaml, metrics.json and the task's prediction files into output_dir.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mora_train.adapters import load_adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically
from mora_train.core.metrics import make_record
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import RunDirLock, refuse_if_being_written
from mora_train.models import DTYPES, load_error, load_model_and_tokenizer
from mora_train.models.config import ModelConfig
from mora_train.pipeline.run_config import ComposedConfig, RunConfig
from mora_train.pipeline.run_dir import check_run_dir, prepare_run_dir
from mora_train.pipeline.scoring import evaluate_model
from mora_train.pipeline.validate import validate
from mora_train.tasks import TASKS
from mora_train.training.checkpoints import file_sha256

log = logging.getLogger(__name__)


def _plain_model(path: Path, model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dtype = DTYPES[model_cfg.dtype]
    trust = model_cfg.trust_remote_code
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - the loading boundary (models.load_error says what and how to fix)
        raise load_error("model", str(path), err, "checkpoint") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001
        raise load_error("tokenizer", str(path), err, "checkpoint") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def verify_outputs(run_dir: Path, name: str) -> str | None:
    """None when RUN_DIR/NAME (merged or adapter) matches RUN_DIR/checksums.json, else what is wrong.

    Run dirs written before checksums.json existed are not checked (None)."""
    try:
        entries = json.loads((RunDir(run_dir).checksums).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"its {RunDir.CHECKSUMS} is unreadable ({type(err).__name__})"
    for relative, entry in entries.items():
        if not relative.startswith(f"{name}/"):
            continue
        path = run_dir / relative
        try:
            if path.stat().st_size != entry["size"]:
                return f"{relative} is {path.stat().st_size} bytes, {RunDir.CHECKSUMS} says {entry['size']}"
            if file_sha256(path) != entry["sha256"]:
                return f"{relative} does not match its sha256 in {RunDir.CHECKSUMS} (corrupted)"
        except FileNotFoundError:
            return f"{relative} is missing"
        except (OSError, KeyError, TypeError) as err:
            return f"{relative} cannot be checked ({type(err).__name__}: {err})"
    return None


def run_dir_output(run_dir: Path) -> Path:
    """The verified output of a run dir to evaluate: merged/, else (missing or corrupt) adapter/."""
    problems: list[str] = []
    for name, marker in ((RunDir.MERGED, "config.json"), (RunDir.ADAPTER, ADAPTER_CONFIG_NAME)):
        if not (run_dir / name / marker).is_file():
            continue
        problem = verify_outputs(run_dir, name)
        if problem is None:
            if problems:
                log.warning("%s; evaluating %s instead", problems[-1], run_dir / name)
            return run_dir / name
        problems.append(f"{run_dir / name} is corrupt: {problem}")
    raise MoraTrainError(
        f"checkpoint={run_dir}: {'; '.join(problems)}. Nothing usable to evaluate; rerun the training, or evaluate "
        "one of its checkpoints (checkpoint=RUN_DIR/checkpoints/checkpoint-N with model=...)"
    )


def load_checkpoint(config: RunConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, what was loaded) for `checkpoint`, as described in the module docstring."""
    if config.checkpoint is None:
        model, tokenizer = load_model_and_tokenizer(config.model)
        return model, tokenizer, "base model"
    path = Path(config.checkpoint).expanduser()
    if (RunDir(path).merged / "config.json").is_file() or (RunDir(path).adapter / ADAPTER_CONFIG_NAME).is_file():
        path = run_dir_output(path)
    if (path / "config.json").is_file():
        model, tokenizer = _plain_model(path, config.model)
        return model, tokenizer, f"model folder {path}"
    if (path / ADAPTER_CONFIG_NAME).is_file():
        base, tokenizer = load_model_and_tokenizer(config.model)
        try:
            model = load_adapter(base, path).merge_and_unload()
        except MoraTrainError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt adapter file, or one of another base model
            raise MoraTrainError(
                f"could not attach the adapter in {path} to model={config.model.name_or_path or 'random init'} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}); its files are "
                "corrupt or it was trained on another base model (set model=... to that one)"
            ) from None
        return model, tokenizer, f"adapter {path} merged into model={config.model.name_or_path or 'random init'}"
    raise MoraTrainError(
        f"`checkpoint={config.checkpoint}` is neither a run dir (with merged/ or adapter/), a model folder "
        f"(config.json) nor an adapter folder ({ADAPTER_CONFIG_NAME})"
    )


def run_eval(composed: ComposedConfig) -> dict[str, Any]:
    """Evaluate `checkpoint` on the task; return the metrics written to metrics.json.

    Holds output_dir's writer lock while it runs (mora_train.core.run_lock), and refuses a checkpoint that
    belongs to a run still being written: its files may change or vanish under the reader."""
    lock = RunDirLock(composed.output_dir, "mora-train mode=eval")  # taken by check_run_dir
    try:
        return _run_eval(composed, lock)
    finally:
        lock.release()


def _run_eval(composed: ComposedConfig, lock: RunDirLock) -> dict[str, Any]:
    started = time.time()
    config = validate(composed)
    refuse_if_being_written(config.checkpoint, "checkpoint=", "mora-train mode=eval")
    check_run_dir(config, lock)  # refusals first; the run dir is written only once the model and data are loaded
    task = TASKS[config.task.name]
    model, tokenizer, loaded = load_checkpoint(config)
    if torch.cuda.is_available():
        torch.nn.Module.to(model, "cuda")  # (transformers' wrapper of .to confuses type checkers)
    # The task's evaluation data, unless only lm-evaluation-harness evaluates (eval.backend=lm_eval).
    build = task.build_eval or task.build
    data = build(config.task, tokenizer, config.trainer.max_seq_len) if config.eval.runs_task else None
    run_dir = prepare_run_dir(config, composed)
    log.info("evaluating %s on task %s", loaded, task.name)
    scores = evaluate_model(config, task, model, tokenizer, data, run_dir)
    identity = {
        "mode": "eval",
        "task": task.name,
        "checkpoint": config.checkpoint,
        "evaluated": loaded,
    }
    metrics = make_record(
        identity,
        scores.primary_metric,
        scores.greater_is_better,
        scores.metrics,
        run={"wall_time_s": time.time() - started},
        lm_eval=scores.lm_eval,
    )
    write_json_atomically(RunDir(run_dir).metrics, metrics)
    return metrics

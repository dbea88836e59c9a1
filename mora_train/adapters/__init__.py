"""The adapter protocol's registry: every method by name, and the operations the rest of mora-train calls.

`build_adapter(model, cfg)` and `load_adapter(model, dir)` give an `Adapter`; `adapter_config_problems`,
`adapter_identity` and `adapter_type` answer questions about a config before any model is loaded.
Nothing outside this package asks which method it holds: what differs between methods is an
operation of `Adapter` (adapters/base.py) or one of its class attributes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, Adapter
from mora_train.adapters.full import FullFineTune
from mora_train.adapters.lora import LoraAdapter
from mora_train.adapters.mora_adapter import MoraAdapter
from mora_train.core.errors import MoraTrainError
from mora_train.models.quantization import is_quantized, prepare_for_adapter_training

__all__ = [
    "ADAPTER_TYPES",
    "Adapter",
    "adapter_config_problems",
    "adapter_identity",
    "adapter_type",
    "build_adapter",
    "load_adapter",
]

ADAPTER_TYPES: dict[str, type[Adapter]] = {cls.name: cls for cls in (LoraAdapter, MoraAdapter, FullFineTune)}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _plain(adapter_cfg: Any) -> dict[str, Any]:
    if isinstance(adapter_cfg, DictConfig):
        return OmegaConf.to_container(adapter_cfg, resolve=True)
    return dict(adapter_cfg or {})


def adapter_type(adapter_cfg: Any) -> type[Adapter]:
    """The Adapter class an `adapter` config names (MoraTrainError naming the choices when none)."""
    name = _plain(adapter_cfg).get("name")
    if name not in ADAPTER_TYPES:
        raise MoraTrainError(f"`adapter.name={name}` is unknown; use {', '.join(f'adapter={n}' for n in ADAPTER_TYPES)}")
    return ADAPTER_TYPES[name]


def adapter_config_problems(adapter_cfg: Any, rank: Any, quantization: str = "none") -> list[str]:
    """Every problem of the `adapter` section and `rank`, one message each naming the key and the fix.

    `quantization`: model.quantization; a method that cannot train on a quantized base says why."""
    if not isinstance(adapter_cfg, (DictConfig, dict)):
        return [f"`adapter` must be a mapping, got {adapter_cfg!r}"]
    settings = _plain(adapter_cfg)
    name = settings.get("name")
    if name not in ADAPTER_TYPES:
        return [f"`adapter.name={name}` is unknown; use {', '.join(f'adapter={n}' for n in ADAPTER_TYPES)}"]
    cls = ADAPTER_TYPES[name]
    problems = []
    for key, value in settings.items():
        types = cls.settings_schema.get(key)
        if types is None:
            problems.append(f"`adapter.{key}` is not a known key of adapter={name}; known keys: {', '.join(sorted(cls.settings_schema))}")
        elif (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            problems.append(f"`adapter.{key}` must be {_type_name(types)}, got {value!r}")
    if "rank" in cls.identity(settings, rank) and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        problems.append(f"`rank={rank}` must be a positive integer (the LoRA rank; MoRA matches its parameter count)")
    dropout = settings.get("dropout", 0.0)
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and not 0.0 <= dropout < 1.0:
        problems.append(f"`adapter.dropout={dropout}` must be in [0, 1)")
    targets = settings.get("target_modules")
    if isinstance(targets, str) and not (targets == "all" and not cls.freezes_base):
        problems.append(f"`adapter.target_modules={targets}` must be a list of module names, e.g. [q_proj, v_proj]")
    if isinstance(targets, list) and (not targets or not all(isinstance(t, str) and t for t in targets)):
        problems.append(f"`adapter.target_modules={targets}` must be a non-empty list of module names")
    if quantization != "none" and cls.quantized_base_refusal:
        problems.append(f"`adapter={name}` with `model.quantization={quantization}`: {cls.quantized_base_refusal}")
    return problems + cls.config_problems(settings, rank)


def adapter_identity(adapter_cfg: Any, rank: Any) -> dict[str, Any]:
    """What a checkpoint written by a run with this config records, and what a resume must match."""
    return adapter_type(adapter_cfg).identity(_plain(adapter_cfg), rank)


def _targets(adapter_cfg: DictConfig) -> list[str] | str:
    targets = adapter_cfg.target_modules
    return targets if isinstance(targets, str) else list(OmegaConf.to_container(targets))


def build_adapter(
    model: PreTrainedModel, adapter_cfg: DictConfig, rank: int, load_base: Callable[[], nn.Module] | None = None
) -> Adapter:
    """Wrap `model` with the method the config names; base weights are frozen unless the method trains them.

    `load_base` loads a fresh copy of the base model; methods that train the base weights themselves
    (full fine-tuning) use it to compute ΔW.
    """
    cls = adapter_type(adapter_cfg)
    dropout = adapter_cfg.get("dropout", 0.0)
    if is_quantized(model):
        if cls.quantized_base_refusal:
            raise MoraTrainError(f"`adapter={cls.name}` with a quantized base (model.quantization): {cls.quantized_base_refusal}")
        prepare_for_adapter_training(model)
    if cls is LoraAdapter:
        return LoraAdapter(model, rank, adapter_cfg.alpha, _targets(adapter_cfg), dropout)
    if cls is MoraAdapter:
        return MoraAdapter(model, rank, adapter_cfg.mora_type, _targets(adapter_cfg), dropout)
    return FullFineTune(model, _targets(adapter_cfg), load_base)


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> Adapter:
    """Attach a saved adapter to its base model and return it (call .merge_and_unload() for a plain model).

    Reads mora-train's own MoRA and full-fine-tuning formats, peft LoRA folders, and adapters trained
    with the official MoRA fork of peft (`use_mora` in adapter_config.json).
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    if not config_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS_NAME).is_file():
        raise MoraTrainError(
            f"{adapter_dir} is not an adapter folder: it needs {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
            "(a run writes them to RUN_DIR/adapter)"
        )
    config = json.loads(config_path.read_text())
    if is_quantized(model):
        # A re-attached adapter must compute what it trained with: build_adapter's k-bit preparation (norms and
        # embeddings of a 16-bit base in float32) and no in-place repack of a 4-bit base by an eval forward.
        prepare_for_adapter_training(model)
    adapter: Adapter
    if config.get("format") == "mora-train" and config.get("adapter") == MoraAdapter.name:
        adapter = MoraAdapter(model, config["rank"], config["mora_type"], config["target_modules"], config["dropout"])
    elif config.get("format") == "mora-train" and config.get("adapter") == FullFineTune.name:
        adapter = FullFineTune(model, config["target_modules"])
    elif config.get("use_mora"):
        from mora_train.adapters.official import load_official_mora

        return load_official_mora(model, adapter_dir, config)
    elif str(config.get("peft_type", "")).upper() == "LORA":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        return LoraAdapter(
            model, config["r"], config["lora_alpha"], config["target_modules"], config["lora_dropout"], peft_model
        )
    else:
        raise MoraTrainError(f"{config_path} describes no adapter mora-train knows (MoRA, LoRA, full, official MoRA fork)")
    adapter.load_weights(adapter_dir)
    return adapter

"""The adapter protocol's registry: every method by name, and the operations the rest of mora-train calls.

`build_adapter(model, settings, rank)` and `load_adapter(model, dir)` give an `Adapter`; `adapter_config_problems`,
`adapter_identity` and `adapter_type` answer questions about the typed `adapter` section (AdapterSettings)
before any model is loaded. Nothing outside this package asks which method it holds: what differs between
methods is an operation of `Adapter` (adapters/base.py), one of its class attributes, or a capability some
methods have (adapters/capabilities.py). `register_adapter` adds a method; each method lives in a folder of its
own (lora/, mora/, full/).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, RANK_PROBLEM, Adapter
from mora_train.adapters.capabilities import TrainsFactorPair
from mora_train.adapters.config import AdapterSettings, TrainerView
from mora_train.adapters.full import FullFineTune
from mora_train.adapters.lora import LoraAdapter
from mora_train.adapters.mora import MoraAdapter
from mora_train.core.errors import MoraTrainError
from mora_train.models.quantization import is_quantized, prepare_for_adapter_training

A = TypeVar("A", bound=Adapter)

__all__ = [
    "ADAPTER_TYPES",
    "Adapter",
    "AdapterSettings",
    "adapter_config_problems",
    "adapter_identity",
    "adapter_type",
    "build_adapter",
    "load_adapter",
    "register_adapter",
]

ADAPTER_TYPES: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[A]) -> type[A]:
    """Make `cls` a method mora-train can run (`adapter.name=<cls.name>`, its keys from `cls.settings_type`) and a
    reader load_adapter asks (`cls.reads`). Returns `cls`, so it also serves as a class decorator. A method
    defined outside mora-train calls this before the config is read; its keys come from a config group file
    of its own (`adapter=<name>` on a Hydra search path) or from overrides."""
    registered = ADAPTER_TYPES.get(cls.name)
    if registered is not None and registered is not cls:
        raise MoraTrainError(f"adapter name {cls.name!r} is taken by {registered.__module__}.{registered.__qualname__}")
    ADAPTER_TYPES[cls.name] = cls
    return cls


for _method in (LoraAdapter, MoraAdapter, FullFineTune):
    register_adapter(_method)


def adapter_type(settings: AdapterSettings) -> type[Adapter]:
    """The Adapter class the `adapter` section names (MoraTrainError naming the choices when none)."""
    if settings.name not in ADAPTER_TYPES:
        raise MoraTrainError(
            f"`adapter.name={settings.name}` is unknown; use {', '.join(f'adapter={n}' for n in ADAPTER_TYPES)}"
        )
    return ADAPTER_TYPES[settings.name]


def adapter_config_problems(
    settings: AdapterSettings, rank: int | None, trainer: TrainerView, quantization: str = "none"
) -> list[str]:
    """What parsing the sections cannot find, one message each naming the key and the fix: `rank` where the
    method uses it, the method on a quantized base (`quantization`: model.quantization), and the method with
    the trainer's restart settings (trainer.restart, trainer.train_embeddings)."""
    cls = adapter_type(settings)
    problems = []
    if "rank" in cls.identity(settings, rank) and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        problems.append(RANK_PROBLEM.format(rank=rank))
    refusal = cls.quantized_base_problem(settings, quantization) if quantization != "none" else None
    if refusal:
        problems.append(f"`adapter={cls.name}` with `model.quantization={quantization}`: {refusal}")
    if trainer.adapter_lr_ratio is not None and not issubclass(cls, TrainsFactorPair):
        problems.append(
            f"`trainer.adapter_lr_ratio={trainer.adapter_lr_ratio:g}` (LoRA+) gives B a learning rate that many times "
            f"A's, and adapter={cls.name} trains no such pair of factors; use adapter=lora, or "
            "trainer.adapter_lr_ratio=null"
        )
    return problems + cls.config_problems(settings, rank, trainer)


def adapter_identity(settings: AdapterSettings, rank: int | None) -> dict[str, Any]:
    """What a checkpoint written by a run with these settings records, and what a resume must match."""
    return adapter_type(settings).identity(settings, rank)


def build_adapter(
    model: PreTrainedModel,
    settings: AdapterSettings,
    rank: int | None,
    load_base: Callable[[], nn.Module] | None = None,
) -> Adapter:
    """Wrap `model` with the method the settings name; base weights are frozen unless the method trains them.

    `load_base` loads a fresh copy of the base model; methods that train the base weights themselves
    (full fine-tuning) use it to compute ΔW.
    """
    cls = adapter_type(settings)
    if is_quantized(model):
        refusal = cls.quantized_base_problem(settings, loaded_quantization(model))
        if refusal:
            raise MoraTrainError(f"`adapter={cls.name}` with a quantized base (model.quantization): {refusal}")
        prepare_for_adapter_training(model)
    return cls.build(model, settings, rank, load_base)


def loaded_quantization(model: nn.Module) -> str:
    """model.quantization of a loaded quantized model: int8 (bitsandbytes' 8-bit layers), else its 4-bit kind."""
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        return "int8"
    for module in model.modules():
        quant_type = getattr(getattr(getattr(module, "weight", None), "quant_state", None), "quant_type", None)
        if quant_type:
            return str(quant_type)
    return "nf4"


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
    for cls in ADAPTER_TYPES.values():
        if cls.reads(config):
            return cls.load(model, adapter_dir, config)
    raise MoraTrainError(
        f"{config_path} describes no adapter mora-train knows: none of {', '.join(ADAPTER_TYPES)} reads it "
        "(mora-train's own folders, peft LoRA, the official MoRA fork)"
    )

"""Adapter registry: build_adapter(model, cfg) for "lora" | "mora" | "full", and load_adapter(model, dir)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from mora_train.adapters.base import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, Adapter
from mora_train.core.errors import MoraTrainError

__all__ = ["Adapter", "build_adapter", "load_adapter"]


def _targets(adapter_cfg: DictConfig) -> list[str] | str:
    targets = adapter_cfg.target_modules
    return targets if isinstance(targets, str) else list(OmegaConf.to_container(targets))


def build_adapter(model: PreTrainedModel, adapter_cfg: DictConfig, rank: int) -> Adapter:
    """Wrap `model` with the adapter the config names; the base weights are frozen unless adapter=full."""
    name = adapter_cfg.name
    if name == "lora":
        from mora_train.adapters.lora import LoraAdapter

        return LoraAdapter(model, rank, adapter_cfg.alpha, _targets(adapter_cfg), adapter_cfg.dropout)
    if name == "mora":
        from mora_train.adapters.mora_adapter import MoraAdapter

        from mora_train.training.restarts import restart_settings

        restart = restart_settings(adapter_cfg)
        # With restarts on, the layers start with the first operator pair of the restart cycle.
        mora_type = restart.mora_types[0] if restart.every_steps > 0 else adapter_cfg.mora_type
        return MoraAdapter(model, rank, mora_type, _targets(adapter_cfg), adapter_cfg.dropout)
    if name == "full":
        from mora_train.adapters.full import FullFineTune

        return FullFineTune(model, _targets(adapter_cfg))
    raise MoraTrainError(f"unknown adapter '{name}'; use adapter=lora, adapter=mora or adapter=full")


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> Adapter:
    """Attach a saved adapter to its base model and return it (call .merge_and_unload() for a plain model).

    Reads mora-train's own MoRA format, peft LoRA folders, and adapters trained with the official
    MoRA fork of peft (`use_mora` in adapter_config.json).
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    if not config_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS_NAME).is_file():
        raise MoraTrainError(
            f"{adapter_dir} is not an adapter folder: it needs {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
            "(a run writes them to RUN_DIR/adapter)"
        )
    config = json.loads(config_path.read_text())
    if config.get("format") == "mora-train" and config.get("adapter") == "mora":
        from mora_train.adapters.mora_adapter import MoraAdapter

        adapter = MoraAdapter(model, config["rank"], config["mora_type"], config["target_modules"], config["dropout"])
        adapter.load_weights(adapter_dir)
        return adapter
    if config.get("use_mora"):
        from mora_train.adapters.official import load_official_mora

        return load_official_mora(model, adapter_dir, config)
    if str(config.get("peft_type", "")).upper() == "LORA":
        from peft import PeftModel

        from mora_train.adapters.lora import LoraAdapter

        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        return LoraAdapter(
            model, config["r"], config["lora_alpha"], config["target_modules"], config["lora_dropout"], peft_model
        )
    raise MoraTrainError(f"{config_path} describes no adapter mora-train knows (MoRA, LoRA, official MoRA fork)")

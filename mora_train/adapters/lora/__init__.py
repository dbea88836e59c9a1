"""LoRA through peft: its settings (config.py) and the model-level adapter (adapter.py); peft holds the layer."""

from mora_train.adapters.lora.adapter import LoraAdapter
from mora_train.adapters.lora.config import LoraSettings

__all__ = ["LoraAdapter", "LoraSettings"]

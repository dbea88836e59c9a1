"""Full fine-tuning: its settings (config.py) and the model-level adapter (adapter.py); the layers are the model's."""

from mora_train.adapters.full.adapter import FullFineTune
from mora_train.adapters.full.config import FullSettings

__all__ = ["FullFineTune", "FullSettings"]

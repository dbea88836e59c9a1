"""The Hub id of a run's base model, for the exports' metadata (`base_model_name_or_path` of a PEFT LoRA folder)."""

from __future__ import annotations

import re

from mora_train.core.paths import looks_like_local_path
from mora_train.models.config import ModelConfig

# `org/name` as the Hugging Face Hub spells repository ids.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def base_model_id(model: ModelConfig) -> str | None:
    """The base model's Hub id when the run knows it: its `model.name_or_path` when that is a Hub id (not a local
    folder, a .gguf file, a file inside an installed package or a random-init model), else None."""
    name = model.name_or_path
    if name is None or model.package or looks_like_local_path(str(name)) or not HUB_ID.fullmatch(str(name)):
        return None
    return str(name)

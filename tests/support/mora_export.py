"""A MoRA adapter with random weights on the tiny Llama, and plain peft's logits for an exported LoRA folder: what
the LoRA export tests start from and compare against."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from mora_train.adapters import build_adapter
from mora_train.models import load_model_and_tokenizer
from tests.conftest import typed_config


def random_mora_adapter(kind: str, rank: int = 8):
    """(typed config, MoRA adapter of type `kind`) with seeded random M matrices (ΔW ≠ 0)."""
    cfg = typed_config(["model=tiny-llama", "adapter=mora", f"adapter.mora_type={kind}", f"rank={rank}"])
    model, _ = load_model_and_tokenizer(cfg.model)
    adapter = build_adapter(model, cfg.adapter, cfg.rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter.trainable_parameters().values():
            p.normal_(0, 0.02)
    return cfg, adapter


def peft_logits(cfg, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a fresh base with the LoRA folder loaded by plain peft."""
    base, _ = load_model_and_tokenizer(cfg.model)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits

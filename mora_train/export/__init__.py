"""Everything a trained adapter leaves the project as, each checked against the trained model:

- merge.py       the merged checkpoint (RUN_DIR/merged): merge -> save -> reload with plain transformers -> compare
- checks.py      the merge check's tolerance (the model's rounding floor) and, on a quantized base, the kernel check
- probe.py       the fixed inputs the checks run on, and the logits a model computes on them
- lora.py        a PEFT LoRA folder from an adapter's LoRA factors, exact or truncated (`mora-train-export`)
- peft_check.py  that folder loaded by plain peft in a process that never imports mora_train
- delta.py       ΔW of a run: adapter re-attached, or merged minus base (the spectrum uses it too)
- gather.py      the adapter to export after ZeRO / FSDP: rebuilt unsharded from the gathered weights
- card.py        the model card (README.md) of every folder above, from the run's facts; card_text.py and
                 card_loading.py write its body
"""

from mora_train.export.checks import (
    FLOOR_FACTOR,
    MERGE_TOLERANCE,
    BeforeCastCheck,
    KernelCheck,
    export_rounding_floor,
    merge_tolerance,
    quantized_reference_logits,
)
from mora_train.export.delta import adapter_deltas, load_merged, merged_deltas, merged_update_factors
from mora_train.export.gather import unsharded_adapter
from mora_train.export.lora import LayerExport, check_truncation, export_lora, truncate
from mora_train.export.merge import ExportConfig, ExportResult, export_merged, reload_merged, save_merged
from mora_train.export.peft_check import PEFT_CHECK_LOG, check_with_peft
from mora_train.export.probe import logits_of, probe_batch, quantized_logits, random_probe_ids

__all__ = [
    "FLOOR_FACTOR",
    "MERGE_TOLERANCE",
    "PEFT_CHECK_LOG",
    "BeforeCastCheck",
    "ExportConfig",
    "ExportResult",
    "KernelCheck",
    "LayerExport",
    "adapter_deltas",
    "check_truncation",
    "check_with_peft",
    "export_lora",
    "export_merged",
    "export_rounding_floor",
    "load_merged",
    "logits_of",
    "merge_tolerance",
    "merged_deltas",
    "merged_update_factors",
    "probe_batch",
    "quantized_logits",
    "quantized_reference_logits",
    "random_probe_ids",
    "reload_merged",
    "save_merged",
    "truncate",
    "unsharded_adapter",
]

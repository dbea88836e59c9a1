"""`mora-train-export`: a run's adapter as a PEFT LoRA folder, checked like a merge.

1. Find the update: the run's adapter (adapters.capabilities.lora_factors: exact for every method that has a low-rank
   form), or — for runs with restarts (ReMoRA / ReLoRA), whose total update is merged − base and not
   the live adapter — the SVD of merged − base for every adapted layer.
2. Write the folder (mora_train.export.lora), exact or truncated (--rank / --energy), with a per-layer
   error table beside it.
3. Check it (mora_train.export.peft_check): a separate Python process that never imports mora_train loads
   the base model and the folder with plain peft and computes logits on a fixed batch; they are compared
   with the adapted model's (the exact types differ by float32 rounding only).
4. Truncated exports (or --evaluate): the task's own evaluation of the adapted model and of the base
   model with the exported LoRA merged, primary metric before / after.

A run on a quantized base (model.quantization) is exported from its de-quantized weights: the LoRA holds
ΔW, and the check runs on the base as the kernels saw it (de-quantized to float32). Serving it needs that
same base — loaded with the same quantization, or de-quantized — not the original full-precision weights,
which differ from it by the quantization error (the report names the base's quantization).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters import load_adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.adapters.capabilities import lora_factors
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically
from mora_train.core.outputs import FOLDER, check_output_target, holds_file
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import refuse_if_being_written
from mora_train.export.card import LORA, write_model_card
from mora_train.export.delta import merged_update_factors
from mora_train.export.lora import REPORT_JSON, LayerExport, check_truncation, export_lora, summarize
from mora_train.export.peft_check import check_with_peft
from mora_train.models import load_model_and_tokenizer
from mora_train.models.config import ModelConfig
from mora_train.models.quantization import as_float32
from mora_train.pipeline.cards import lora_card_facts
from mora_train.pipeline.run_config import RunConfig, named_model_config, saved_run_config
from mora_train.tasks import TASKS

log = logging.getLogger(__name__)


def _adapter_folder(source: Path) -> Path:
    if (source / ADAPTER_CONFIG_NAME).is_file():
        return source
    if (RunDir(source).adapter / ADAPTER_CONFIG_NAME).is_file():
        return RunDir(source).adapter
    raise MoraTrainError(
        f"{source} is neither a run dir with adapter/ nor an adapter folder ({ADAPTER_CONFIG_NAME}): give "
        "RUN_DIR (a finished LoRA or MoRA run) or RUN_DIR/adapter"
    )


def _evaluate(config: RunConfig, model: nn.Module, tokenizer: Any, out_dir: Path) -> tuple[str, float | None, dict]:
    task = TASKS[config.task.name]
    build = task.build_eval or task.build
    data = build(config.task, tokenizer, config.trainer.max_seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = task.evaluate(config.task, model.eval(), tokenizer, data, out_dir)
    return task.primary_metric, metrics.get(task.primary_metric), metrics


def _refuse_bad_arguments(source: Path, rank: int | None, energy: float | None) -> None:
    if not source.exists():
        raise MoraTrainError(
            f"{source} does not exist; give a run dir (RUN_DIR) or an adapter folder (RUN_DIR/adapter)"
        )
    check_truncation(rank, energy)


def _model_config(source: Path, run_cfg: RunConfig | None, base_model: str | None) -> ModelConfig:
    """The base model's config: --base-model's, else the run's; a run that trained its embeddings is refused."""
    if run_cfg is not None and run_cfg.trainer.train_embeddings:
        raise MoraTrainError(
            f"{source} also trained the input embeddings and the LM head (trainer.train_embeddings=true), which a "
            "LoRA adapter cannot carry; serve its merged model (RUN_DIR/merged) instead"
        )
    if base_model is not None:
        return named_model_config(base_model)
    if run_cfg is not None:
        return run_cfg.model
    raise MoraTrainError(
        f"{source} is not a run dir (no resolved_config.yaml): pass --base-model (config name, Hub id or folder)"
    )


def _update_factors(
    source: Path, run_cfg: RunConfig | None, adapter_dir: Path, base: PreTrainedModel, trust_remote_code: bool
) -> tuple[dict, nn.Module, str]:
    """The LoRA factors of the run's update, the model they reproduce, and how they were found."""
    if run_cfg is not None and run_cfg.trainer.restart.every_steps > 0:
        # The live adapter holds only the last cycle: the update the run made is merged − base.
        saved = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
        targets = saved.get("target_modules") or list(run_cfg.adapter.target_modules)
        factors, reference = merged_update_factors(source, base, list(targets), trust_remote_code)
        return factors, reference, "SVD of merged - base (a run with restarts)"
    adapter = load_adapter(base, adapter_dir)
    return lora_factors(adapter), adapter.model.eval(), f"{adapter.title()}: exact LoRA factors"


def _evaluate_export(
    run_cfg: RunConfig, reference: nn.Module, fresh_base: nn.Module, tokenizer: Any, out_dir: Path
) -> dict:
    """The task's primary metric of the adapted model and of the base with the exported LoRA merged."""
    from peft import PeftModel

    eval_root = out_dir / "evaluation"
    name, before, _ = _evaluate(run_cfg, reference, tokenizer, eval_root / "adapter")
    exported = PeftModel.from_pretrained(fresh_base, str(out_dir)).merge_and_unload()
    _, after, _ = _evaluate(run_cfg, exported, tokenizer, eval_root / "exported_lora")
    return {"metric": name, "adapter": before, "exported_lora": after}


def export_run(
    source: str | Path,
    out_dir: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    base_model: str | None = None,
    check: bool = True,
    evaluate: bool | None = None,
) -> dict[str, Any]:
    """Export SOURCE (a run dir or an adapter folder) as a PEFT LoRA folder in OUT_DIR; return the report.

    `evaluate` (default: for truncated exports of a run dir) re-runs the run's task on the adapted model and
    on the export; an adapter folder has no task to run, so it is evaluated only when asked, and refused then."""
    # Before anything loads: OUT_DIR is replaced whole, so never a folder the export did not write, nor the source.
    check_output_target(out_dir, "mora-train-export", "OUT_DIR", FOLDER, [source, base_model], holds_file(REPORT_JSON))
    refuse_if_being_written(source, "SOURCE", "mora-train-export")
    started = time.time()
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    _refuse_bad_arguments(source, rank, energy)
    run_cfg = saved_run_config(source)
    if evaluate and run_cfg is None:
        raise MoraTrainError("--evaluate needs a run dir (its task config says how to evaluate)")
    model_cfg = _model_config(source, run_cfg, base_model)
    adapter_dir = _adapter_folder(source)
    trust_remote_code = model_cfg.trust_remote_code
    base, fresh_base, tokenizer = _load_bases(model_cfg)
    factors, reference, how = _update_factors(source, run_cfg, adapter_dir, base, trust_remote_code)
    rows = export_lora(
        factors,
        out_dir,
        rank=rank,
        energy=energy,
        base_model=getattr(fresh_base.config, "_name_or_path", None) or None,
        source={"path": str(source.resolve()), "how": how},
    )
    report = _summary(source, how, rows, rank is not None or energy is not None, model_cfg.quantization_name)
    if check:
        report["peft_max_abs_logit_diff"] = check_with_peft(fresh_base, out_dir, reference, trust_remote_code)
    if run_cfg is not None and (evaluate or (evaluate is None and report["truncated"])):  # evaluate needs a run
        report["evaluation"] = _evaluate_export(run_cfg, reference, fresh_base, tokenizer, out_dir)
    report["export_time_s"] = time.time() - started
    table = json.loads((out_dir / REPORT_JSON).read_text())
    write_json_atomically(out_dir / REPORT_JSON, {**table, "summary": report})
    write_model_card(out_dir, lora_card_facts(source, model_cfg, report), LORA)
    return report


def _load_bases(model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """The base model twice, in float32 (a quantized base: its de-quantized weights, which the LoRA's ΔW adds
    to): one to attach the adapter to, one never wrapped for the peft check; and the tokenizer."""
    base, tokenizer = load_model_and_tokenizer(model_cfg)
    base = as_float32(base).eval()
    fresh_base = as_float32(load_model_and_tokenizer(model_cfg)[0]).eval()
    return base, fresh_base, tokenizer


def _summary(
    source: Path, how: str, rows: list[LayerExport], truncated: bool, base_quantization: str
) -> dict[str, Any]:
    """The report's summary of what was exported, before the checks add theirs."""
    report: dict[str, Any] = {"source": str(source), "how": how, **summarize(rows)}
    report["rank"] = max(r.rank for r in rows)
    report["truncated"] = truncated
    report["base_quantization"] = base_quantization
    return report

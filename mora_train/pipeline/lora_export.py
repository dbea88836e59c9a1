"""`mora-train-export`: a run's adapter as a PEFT LoRA folder, checked like a merge.

1. Find the update: the run's adapter (adapters.capabilities.lora_factors: exact for every method that has a low-rank
   form), or — for runs with restarts (ReMoRA / ReLoRA), whose total update is merged − base and not
   the live adapter — the SVD of merged − base for every adapted layer.
2. Write the folder (mora_train.export.lora), exact or truncated (--rank / --energy), each layer at its own rank
   (peft's rank_pattern) or zero-padded to one (--uniform-rank), in the base model's dtype (or --dtype), with a
   per-layer error table beside it and the base model's Hub id where the run knows it (pipeline/base_model.py).
3. Check it (mora_train.export.peft_check): a separate Python process that never imports mora_train loads
   the base model and the folder with plain peft and computes logits on a fixed batch; they are compared
   with the adapted model's (the exact types differ by float32 rounding only).
4. Truncated exports (or --evaluate): the task's own evaluation of the adapted model and of the base
   model with the exported LoRA merged, primary metric before / after, written next to the folder
   (OUT_DIR-evaluation/), never into it: the folder holds only what a serving engine loads and its report.

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

import torch
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters import load_adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.adapters.capabilities import lora_factors
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically, write_json_atomically
from mora_train.core.outputs import FOLDER, check_output_target, holds_file
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import refuse_if_being_written
from mora_train.export.card import LORA, write_model_card
from mora_train.export.delta import merged_update_factors
from mora_train.export.lora import REPORT_JSON, LayerExport, check_truncation, export_lora, summarize
from mora_train.export.peft_check import check_with_peft
from mora_train.models import load_model_and_tokenizer
from mora_train.models.config import ModelConfig
from mora_train.models.hub import base_model_id
from mora_train.models.quantization import as_float32
from mora_train.pipeline.cards import lora_card_facts
from mora_train.pipeline.run_config import RunConfig, named_model_config, saved_run_config
from mora_train.tasks import TASKS

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _refuse_bad_arguments(source: Path, rank: int | None, energy: float | None, dtype: str | None) -> None:
    if not source.exists():
        raise MoraTrainError(
            f"{source} does not exist; give a run dir (RUN_DIR) or an adapter folder (RUN_DIR/adapter)"
        )
    check_truncation(rank, energy)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise MoraTrainError(f"--dtype {dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")


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
    return lora_factors(adapter), adapter.model.eval(), adapter.title()


def _how(found: str, truncated: bool, rank: int | None, energy: float | None, rows: list[LayerExport]) -> str:
    """How the export relates to the trained update, in words that hold: exact only when nothing was cut."""
    if not truncated:
        return f"{found}: exact LoRA factors (to float32 rounding)"
    cut = f"--rank {rank}" if rank is not None else f"--energy {energy}"
    worst = max(r.relative_error for r in rows)
    return f"{found}: truncated SVD ({cut}), relative error of ΔW up to {worst:.2e}, not exact"


def _evaluate_export(
    run_cfg: RunConfig, reference: nn.Module, fresh_base: nn.Module, tokenizer: Any, out_dir: Path
) -> dict:
    """The task's primary metric of the adapted model and of the base with the exported LoRA merged, each
    evaluation's files written (atomically, replacing an earlier one) into OUT_DIR-evaluation."""
    from peft import PeftModel

    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        name, before, _ = _evaluate(run_cfg, reference, tokenizer, tmp / "adapter")
        exported = PeftModel.from_pretrained(fresh_base, str(out_dir)).merge_and_unload()
        _, after, _ = _evaluate(run_cfg, exported, tokenizer, tmp / "exported_lora")
        result.update(metric=name, adapter=before, exported_lora=after)
        write_json_atomically(tmp / EVALUATION_JSON, {"export": str(out_dir), **result})

    folder = evaluation_dir(out_dir)
    write_dir_atomically(folder, write)
    return {**result, "folder": str(folder)}


EVALUATION_JSON = "export_evaluation.json"  # in OUT_DIR-evaluation: the primary metric before / after


def evaluation_dir(out_dir: Path) -> Path:
    """Where a truncated export's evaluation goes: next to the exported folder, never inside it."""
    return out_dir.with_name(f"{out_dir.name}-evaluation")


def _evaluation_planned(
    run_cfg: RunConfig | None, evaluate: bool | None, truncated: bool, out_dir: Path, sources: list
) -> bool:
    """Whether the export is evaluated (asked, or by default a truncated export of a run dir); its folder is
    checked before anything loads, like OUT_DIR: replaced whole, so never one the export did not write."""
    planned = run_cfg is not None and (evaluate or (evaluate is None and truncated))
    if planned:
        option = "the evaluation folder (OUT_DIR-evaluation)"
        check_output_target(
            evaluation_dir(out_dir), "mora-train-export", option, FOLDER, sources, holds_file(EVALUATION_JSON)
        )
    return bool(planned)


def export_run(
    source: str | Path,
    out_dir: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    base_model: str | None = None,
    check: bool = True,
    evaluate: bool | None = None,
    dtype: str | None = None,
    uniform_rank: bool = False,
) -> dict[str, Any]:
    """Export SOURCE (a run dir or an adapter folder) as a PEFT LoRA folder in OUT_DIR; return the report.

    `evaluate` (default: for truncated exports of a run dir) re-runs the run's task on the adapted model and
    on the export, into OUT_DIR-evaluation; an adapter folder has no task to run, so it is evaluated only when
    asked, and refused then. `dtype` (float32 | bfloat16 | float16; default the base model's) is the exported
    weights'; `uniform_rank` zero-pads every layer to the largest rank instead of peft's rank_pattern."""
    # Before anything loads: OUT_DIR is replaced whole, so never a folder the export did not write, nor the source.
    check_output_target(out_dir, "mora-train-export", "OUT_DIR", FOLDER, [source, base_model], holds_file(REPORT_JSON))
    refuse_if_being_written(source, "SOURCE", "mora-train-export")
    started = time.time()
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    _refuse_bad_arguments(source, rank, energy, dtype)
    run_cfg = saved_run_config(source)
    if evaluate and run_cfg is None:
        raise MoraTrainError("--evaluate needs a run dir (its task config says how to evaluate)")
    truncated = rank is not None or energy is not None
    evaluating = _evaluation_planned(run_cfg, evaluate, truncated, out_dir, [source, base_model, out_dir])
    model_cfg = _model_config(source, run_cfg, base_model)
    base, fresh_base, tokenizer, base_dtype = _load_bases(model_cfg)
    found = _update_factors(source, run_cfg, _adapter_folder(source), base, model_cfg.trust_remote_code)
    factors, reference, title = found
    rows = export_lora(
        factors,
        out_dir,
        rank=rank,
        energy=energy,
        base_model=base_model_id(model_cfg),
        source={"path": str(source.resolve()), "how": title},
        dtype=EXPORT_DTYPES[dtype] if dtype else base_dtype,
        uniform_rank=uniform_rank,
    )
    table = json.loads((out_dir / REPORT_JSON).read_text())
    report = _summary(source, _how(title, truncated, rank, energy, rows), rows, table, model_cfg.quantization_name)
    report["base_model_name_or_path"] = base_model_id(model_cfg)
    if check:
        report["peft_max_abs_logit_diff"] = check_with_peft(fresh_base, out_dir, reference, model_cfg.trust_remote_code)
    if evaluating and run_cfg is not None:  # (a run dir: its task says how to evaluate)
        report["evaluation"] = _evaluate_export(run_cfg, reference, fresh_base, tokenizer, out_dir)
    report["export_time_s"] = time.time() - started
    table["source"]["how"] = report["how"]
    write_json_atomically(out_dir / REPORT_JSON, {**table, "summary": report})
    write_model_card(out_dir, lora_card_facts(source, model_cfg, report), LORA)
    return report


def _load_bases(model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedModel, Any, torch.dtype]:
    """The base model twice, in float32 (a quantized base: its de-quantized weights, which the LoRA's ΔW adds
    to): one to attach the adapter to, one never wrapped for the peft check; the tokenizer; and the dtype the base
    model is loaded in (its embeddings': a quantized base's compute dtype), the exported weights' default."""
    base, tokenizer = load_model_and_tokenizer(model_cfg)
    base_dtype: torch.dtype = next(base.get_input_embeddings().parameters()).dtype
    base = as_float32(base).eval()
    fresh_base = as_float32(load_model_and_tokenizer(model_cfg)[0]).eval()
    return base, fresh_base, tokenizer, base_dtype


def _summary(
    source: Path, how: str, rows: list[LayerExport], table: dict[str, Any], base_quantization: str
) -> dict[str, Any]:
    """The report's summary of what was exported, before the checks add theirs."""
    report: dict[str, Any] = {"source": str(source), "how": how, **summarize(rows, table["uniform_rank"])}
    report["rank"] = max(r.rank for r in rows)
    report["truncated"] = table["truncation"]["rank"] is not None or table["truncation"]["energy"] is not None
    report["uniform_rank"] = table["uniform_rank"]
    report["dtype"] = table["dtype"]
    report["base_quantization"] = base_quantization
    if "rank_limit_fit" in table:
        report["rank_limit_fit"] = table["rank_limit_fit"]
    return report

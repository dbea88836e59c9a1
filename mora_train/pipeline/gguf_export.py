"""`mora-train-export RUN_DIR OUT_DIR --format gguf`: a run's merged model as a llama.cpp GGUF file, checked.

1. Find the model folder: RUN_DIR/merged (a plain transformers checkpoint), or SOURCE itself when it is one.
2. Write OUT_DIR (atomically, a new folder or one an earlier GGUF export wrote): model-OUTTYPE.gguf
   (mora_train.export.gguf), an Ollama Modelfile and gguf_export.json (what was written and how it checked).
3. Check it (mora_train.export.gguf_check): transformers' own GGUF loader reads the file back and its logits are
   compared with the merged model's, rounded as the file stores it; a failed check exits 2 and keeps OUT_DIR for
   inspection.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_dir_atomically, write_json_atomically
from mora_train.core.outputs import FOLDER, check_output_target, holds_file
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import refuse_if_being_written
from mora_train.export.card import GGUF, GgufExport, write_model_card
from mora_train.export.gguf import (
    MODELFILE,
    OUTTYPE_OF_DTYPE,
    OUTTYPES,
    gguf_file_name,
    write_gguf,
    write_modelfile,
)
from mora_train.export.gguf_check import check_gguf
from mora_train.pipeline.cards import export_card_facts
from mora_train.pipeline.run_config import saved_run_config

log = logging.getLogger(__name__)

GGUF_REPORT_JSON = "gguf_export.json"  # in OUT_DIR: marks a folder this export wrote (it may replace it)


def model_folder(source: Path) -> Path:
    """The transformers folder to convert: RUN_DIR/merged, or SOURCE when it is a model folder itself."""
    if (source / "config.json").is_file():
        return source
    run = RunDir(source)
    if (run.merged / "config.json").is_file():
        return run.merged
    if run.merged_unverified.is_dir():
        raise MoraTrainError(
            f"{source}'s merged model failed its merge check (it is kept in {run.merged_unverified}); a GGUF of it "
            "would not be the model the run trained. Fix the run (see its train.log) and export again"
        )
    raise MoraTrainError(
        f"{source} is neither a run dir with a merged model (RUN_DIR/merged) nor a model folder (config.json); "
        "give a finished run dir or a folder written by save_pretrained"
    )


def _dtype_outtype(config: Any) -> str:
    """The output type that keeps the checkpoint's own precision (its config's dtype; f32 when it names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return OUTTYPE_OF_DTYPE.get(dtype, "f32")  # type: ignore[arg-type]


def _model_name(source: Path) -> str:
    """general.name of the file: the base model and method of the run (the folder's name for a model folder)."""
    run_cfg = saved_run_config(source) if source.is_dir() else None
    if run_cfg is None:
        return source.resolve().name
    base = Path(str(run_cfg.model.name_or_path)).name if run_cfg.model.name_or_path else "random-init"
    return f"{base.removesuffix('.gguf')} + {run_cfg.adapter.name} (mora-train)"


def export_gguf(source: str | Path, out_dir: str | Path, outtype: str | None = None, check: bool = True) -> dict:
    """Export SOURCE (a run dir or a model folder) as a GGUF file in OUT_DIR; return the report."""
    from transformers import AutoConfig, AutoTokenizer

    check_output_target(out_dir, "mora-train-export", "OUT_DIR", FOLDER, [source], holds_file(GGUF_REPORT_JSON))
    refuse_if_being_written(source, "SOURCE", "mora-train-export")
    if outtype is not None and outtype not in OUTTYPES:
        raise MoraTrainError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    started = time.time()
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    if not source.exists():
        raise MoraTrainError(f"{source} does not exist; give a run dir (RUN_DIR) or a model folder")
    model_dir = model_folder(source)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    outtype = outtype or _dtype_outtype(config)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        gguf_file = write_gguf(
            model_dir, tmp / gguf_file_name(outtype), outtype, _model_name(source), config, tokenizer
        )
        write_modelfile(tmp, gguf_file)
        written.update(dataclasses.asdict(gguf_file), path=str(out_dir / gguf_file.path.name))
        write_json_atomically(tmp / GGUF_REPORT_JSON, {"source": str(source.resolve()), **written})

    write_dir_atomically(out_dir, write)
    report: dict[str, Any] = {"source": str(source), "model_dir": str(model_dir), **written}
    report["write_time_s"] = time.time() - started
    if check:
        result = check_gguf(model_dir, out_dir, gguf_file_name(outtype), outtype, tokenizer, written["tokenizer_pre"])
        report["check"] = {**dataclasses.asdict(result), "passed": result.passed}
    report["export_time_s"] = time.time() - started
    write_json_atomically(out_dir / GGUF_REPORT_JSON, report)
    if check and not report["check"]["passed"]:
        raise MoraTrainError(_failed_check(out_dir, report["check"]))
    _write_card(source, out_dir, report)
    return report


def _write_card(source: Path, out_dir: Path, report: dict[str, Any]) -> None:
    """The folder's README.md from the run's card facts; a model folder that no run wrote gets none (nothing is
    known of its training)."""
    run_cfg = saved_run_config(source) if source.is_dir() else None
    if run_cfg is None:
        return
    check = report.get("check") or {}
    gguf = GgufExport(
        file=Path(report["path"]).name,
        outtype=str(report["outtype"]),
        modelfile=MODELFILE,
        max_abs_logit_diff=check.get("outtype_max_abs_diff"),
    )
    facts = dataclasses.replace(export_card_facts(source, run_cfg.model), gguf=gguf)
    write_model_card(out_dir, facts, GGUF)


def _failed_check(out_dir: Path, check: dict) -> str:
    if check["tokenizer_matches"] is False:
        return (
            f"the GGUF file in {out_dir} carries a tokenizer that transformers reads back differently from the "
            "model's own (a probe text encodes to other ids); the file is kept for inspection. Please report this "
            "with the model's tokenizer files"
        )
    return (
        f"the GGUF file in {out_dir}, read back by transformers, does not reproduce the merged model: max |logit "
        f"difference| {check['max_abs_diff']:.3g} > {check['tolerance']:.3g} with the same rounding. The file is "
        "kept for inspection; please report this with the model's config.json"
    )

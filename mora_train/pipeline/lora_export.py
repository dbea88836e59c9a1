"""`mora-train-export`: a run's adapter as a PEFT LoRA folder, checked like a merge.

1. Find the update: the run's adapter (Adapter.lora_factors: exact for every method that has a low-rank
   form), or — for runs with restarts (ReMoRA / ReLoRA), whose total update is merged − base and not
   the live adapter — the SVD of merged − base for every adapted layer.
2. Write the folder (mora_train.export_lora), exact or truncated (--rank / --energy), with a per-layer
   error table beside it.
3. Check it: a separate Python process that never imports mora_train loads the base model and the
   folder with plain peft and computes logits on a fixed batch; they are compared with the adapted
   model's (the exact types differ by float32 rounding only).
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters import load_adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME, match_target_linears, svd_factors
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically, write_text_atomically
from mora_train.core.outputs import FOLDER, check_output_target, holds_file
from mora_train.core.run_lock import refuse_if_being_written
from mora_train.export_lora import REPORT_JSON, export_lora, summarize
from mora_train.models import load_model_and_tokenizer
from mora_train.models.config import ModelConfig
from mora_train.models.quantization import as_float32
from mora_train.pipeline.run_config import RunConfig, named_model_config, saved_run_config
from mora_train.tasks import TASKS

log = logging.getLogger(__name__)

# Run in a fresh interpreter: proves the folder needs nothing but torch, transformers and peft. argv[5] is
# model.trust_remote_code, always given: left unset, transformers asks on stdin before running custom code.
PEFT_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=sys.argv[5] == "1")
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert not any(name.startswith("mora_train") for name in sys.modules), "mora_train was imported"
torch.save(logits, sys.argv[4])
"""


def _adapter_folder(source: Path) -> Path:
    if (source / ADAPTER_CONFIG_NAME).is_file():
        return source
    if (source / "adapter" / ADAPTER_CONFIG_NAME).is_file():
        return source / "adapter"
    raise MoraTrainError(
        f"{source} is neither a run dir with adapter/ nor an adapter folder ({ADAPTER_CONFIG_NAME}): give "
        "RUN_DIR (a finished LoRA or MoRA run) or RUN_DIR/adapter"
    )


def _total_update_factors(
    run_dir: Path, base: nn.Module, targets: list[str], trust_remote_code: bool = False
) -> tuple[dict, nn.Module]:
    """merged − base for every adapted layer, as SVD factors (exact to rounding at the numerical rank)."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        run_dir / "merged", dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    layers, unmatched = match_target_linears(base, targets)
    if unmatched:
        raise MoraTrainError(f"{run_dir}: its adapter's target_modules {unmatched} match no layer of the base model")
    factors = {}
    merged_modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            delta = merged_modules[name].weight.float() - layer.weight.float()
            factors[name] = svd_factors(delta)
    return factors, merged


def _probe(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, max(4, vocab_size), (2, 16), generator=generator)


PEFT_CHECK_LOG = "peft_check_stderr.log"  # in the export folder when the plain-peft check fails


def check_with_peft(
    base: PreTrainedModel, folder: Path, reference: nn.Module, trust_remote_code: bool = False
) -> float:
    """Max |logit difference| between `reference` and plain peft's base + exported folder (other process)."""
    ids = _probe(base.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory(prefix="mora-export-check-") as tmp_name:
        tmp = Path(tmp_name)
        base.save_pretrained(tmp / "base")
        torch.save(ids, tmp / "ids.pt")
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                PEFT_CHECK,
                str(tmp / "base"),
                str(folder),
                str(tmp / "ids.pt"),
                str(tmp / "out.pt"),
                "1" if trust_remote_code else "0",
            ],
            capture_output=True,
            check=False,  # a failure is read from its stderr below
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            log_path = Path(folder) / PEFT_CHECK_LOG
            write_text_atomically(log_path, done.stderr)
            raise MoraTrainError(
                f"plain peft could not load the exported folder {folder}: {_last_error_line(done.stderr)} "
                f"(its whole output: {log_path})"
            )
        got = torch.load(tmp / "out.pt")
    return float((got.float() - expected).abs().max())


def _last_error_line(stderr: str, limit: int = 400) -> str:
    """A Python traceback's final exception (its message's lines joined into one), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for start in range(len(lines) - 1, -1, -1):
        name = lines[start].split(":", 1)[0]
        if ":" in lines[start] and " " not in name and name.endswith(("Error", "Exception")):
            text = " ".join(lines[start:])
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return lines[-1] if lines else "no output"


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
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise MoraTrainError(f"--rank {rank!r} must be a positive integer (the LoRA rank to keep per layer)")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise MoraTrainError(f"--energy {energy!r} must be in (0, 1]: the share of each layer's ΔW energy to keep")


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
        factors, reference = _total_update_factors(source, base, list(targets), trust_remote_code)
        return factors, reference, "SVD of merged - base (a run with restarts)"
    adapter = load_adapter(base, adapter_dir)
    return adapter.lora_factors(), adapter.model.eval(), f"{adapter.title()}: exact LoRA factors"


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
    base, tokenizer = load_model_and_tokenizer(model_cfg)
    base = as_float32(base).eval()  # a quantized base: its de-quantized weights, which the LoRA's ΔW adds to
    fresh_base = as_float32(load_model_and_tokenizer(model_cfg)[0]).eval()  # never wrapped: for the peft check
    factors, reference, how = _update_factors(source, run_cfg, adapter_dir, base, trust_remote_code)
    rows = export_lora(
        factors,
        out_dir,
        rank=rank,
        energy=energy,
        base_model=getattr(fresh_base.config, "_name_or_path", None) or None,
        source={"path": str(source.resolve()), "how": how},
    )
    report: dict[str, Any] = {"source": str(source), "how": how, **summarize(rows)}
    report["rank"] = max(r.rank for r in rows)
    report["truncated"] = rank is not None or energy is not None
    report["base_quantization"] = model_cfg.quantization_name
    if check:
        report["peft_max_abs_logit_diff"] = check_with_peft(fresh_base, out_dir, reference, trust_remote_code)
    if run_cfg is not None and (evaluate or (evaluate is None and report["truncated"])):  # evaluate needs a run
        report["evaluation"] = _evaluate_export(run_cfg, reference, fresh_base, tokenizer, out_dir)
    report["export_time_s"] = time.time() - started
    table = json.loads((out_dir / REPORT_JSON).read_text())
    write_json_atomically(out_dir / REPORT_JSON, {**table, "summary": report})
    return report

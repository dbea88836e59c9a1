"""`mora-train-export SOURCE OUT_DIR [--rank R | --energy E]`: a run's adapter as a PEFT LoRA folder."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mora_train.core.errors import run_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-train-export",
        description=(
            "Write a run's adapter as a standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) "
            "that peft, vLLM, SGLang and LoRAX load. Exact for LoRA and MoRA's summing types and truncation "
            "(rank r̂); MoRA rope/decouple export exactly at their numerical rank, or truncated with --rank/--energy "
            "(per-layer error table in OUT_DIR/export_report.md). Runs with restarts export merged - base."
        ),
        epilog="Example: mora-train-export outputs/2026-11-30/12-00-00 exported/ --rank 32",
    )
    parser.add_argument("source", help="a run dir (RUN_DIR) or an adapter folder (RUN_DIR/adapter; needs --base-model)")
    parser.add_argument(
        "out_dir",
        help="where to write the PEFT LoRA folder: a new or empty folder, or one an earlier "
        "export wrote (replaced whole); never SOURCE, inside it, or a folder of other files",
    )
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--rank", type=int, help="keep at most R singular directions per layer (truncated SVD)")
    cut.add_argument(
        "--energy", type=float, help="keep the singular values holding this share of each layer's ΔW energy, in (0, 1]"
    )
    parser.add_argument(
        "--base-model", help="the base model (config name, Hub id or folder) when SOURCE is not a run dir"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip loading the export with plain peft and comparing logits"
    )
    parser.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-run the task's evaluation on the adapter and on the export "
        "(default: for truncated exports of a run dir)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def work():  # the pipeline is imported here, so that --help stays fast (no torch import)
        from mora_train.pipeline.lora_export import export_run

        return export_run(
            args.source,
            args.out_dir,
            rank=args.rank,
            energy=args.energy,
            base_model=args.base_model,
            check=not args.no_check,
            evaluate=args.evaluate,
        )

    report = run_command("mora-train-export", work)
    print(_summary(report, args.out_dir))


def _summary(report: dict[str, Any], out_dir: str) -> str:
    """What was exported and how exact it is, the plain-peft check and evaluation if run, and how to serve it."""
    lines = [
        f"exported {report['layers']} layers as LoRA rank {report['rank']} to {out_dir} ({report['how']})",
        (
            f"relative Frobenius error of ΔW: max {report['max_relative_error']:.2e}, "
            f"mean {report['mean_relative_error']:.2e} (per layer: {out_dir}/export_report.md)"
        ),
    ]
    if "peft_max_abs_logit_diff" in report:
        lines.append(f"plain peft check: max |logit difference| {report['peft_max_abs_logit_diff']:.2e}")
    if "evaluation" in report:
        ev = report["evaluation"]
        lines.append(f"{ev['metric']}: adapter {ev['adapter']:.4f} -> exported LoRA {ev['exported_lora']:.4f}")
    serve = report["vllm_max_lora_rank"]
    if serve is None:
        lines.append(
            f"warning: rank {report['rank']} is above vLLM's largest --max-lora-rank (512); peft serves it, vLLM "
            "does not: export with --rank 512 (or --energy) for vLLM"
        )
    else:
        lines.append(f"serve: vllm serve BASE --enable-lora --max-lora-rank {serve} --lora-modules NAME={out_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

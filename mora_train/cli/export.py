"""`mora-train-export SOURCE OUT_DIR [--format lora|gguf]`: a run's adapter as a PEFT LoRA folder (default), or its
merged model as a llama.cpp GGUF file with an Ollama Modelfile."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mora_train.core.errors import run_command

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # mora_train.export.gguf.OUTTYPES (not imported: --help stays fast)
DTYPES = ("float32", "bfloat16", "float16")
LORA_ONLY = ("rank", "energy", "base_model", "evaluate", "dtype", "uniform_rank")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-train-export",
        description=(
            "--format lora (default): write a run's adapter as a standard PEFT LoRA folder (adapter_config.json + "
            "adapter_model.safetensors) that peft, vLLM, SGLang and LoRAX load. Exact for LoRA and MoRA's summing "
            "types and truncation (rank r̂); MoRA rope/decouple export exactly at their numerical rank, or truncated "
            "with --rank/--energy (per-layer error table in OUT_DIR/export_report.md). Runs with restarts export "
            "merged - base. --format gguf: write the run's merged model as a llama.cpp GGUF file "
            "(OUT_DIR/model-OUTTYPE.gguf) with its tokenizer and chat template, and an Ollama Modelfile; "
            "transformers' GGUF loader reads it back and its logits are checked against the merged model's."
        ),
        epilog=(
            "Examples: mora-train-export outputs/2026-11-30/12-00-00 exported/ --rank 32; "
            "mora-train-export outputs/2026-11-30/12-00-00 gguf/ --format gguf --outtype q8_0"
        ),
    )
    parser.add_argument(
        "source",
        help="a run dir (RUN_DIR); --format lora: or an adapter folder (RUN_DIR/adapter; needs --base-model); "
        "--format gguf: or a model folder (RUN_DIR/merged)",
    )
    parser.add_argument(
        "out_dir",
        help="where to write: a new or empty folder, or one an earlier export of the same format wrote (replaced "
        "whole); never SOURCE, inside it, or a folder of other files",
    )
    parser.add_argument("--format", choices=("lora", "gguf"), default="lora", help="what to export (default: lora)")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check: lora, loading the export with plain peft; gguf, reading it back with transformers",
    )
    _add_gguf_and_lora_options(parser)
    return parser


def _add_gguf_and_lora_options(parser: argparse.ArgumentParser) -> None:
    gguf = parser.add_argument_group("--format gguf")
    gguf.add_argument(
        "--outtype",
        choices=OUTTYPES,
        help="how the matrices are stored (norms and biases stay f32); default: the merged checkpoint's own dtype",
    )
    lora = parser.add_argument_group("--format lora")
    cut = lora.add_mutually_exclusive_group()
    cut.add_argument("--rank", type=int, help="keep at most R singular directions per layer (truncated SVD)")
    cut.add_argument(
        "--energy", type=float, help="keep the singular values holding this share of each layer's ΔW energy, in (0, 1]"
    )
    lora.add_argument(
        "--base-model", help="the base model (config name, Hub id or folder) when SOURCE is not a run dir"
    )
    lora.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-run the task's evaluation on the adapter and on the export, into OUT_DIR-evaluation/ next to "
        "OUT_DIR (default: for truncated exports of a run dir)",
    )
    lora.add_argument("--dtype", choices=DTYPES, help="the exported weights' dtype (default: the base model's)")
    lora.add_argument(
        "--uniform-rank",
        action="store_true",
        help="zero-pad every layer to the largest rank, for engines that take one r per adapter (SGLang); by default "
        "each layer keeps its own rank (peft's rank_pattern)",
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    defaults = parser.parse_args([args.source, args.out_dir])
    if args.format == "gguf":
        given = [name for name in LORA_ONLY if getattr(args, name) != getattr(defaults, name)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} applies to --format lora only; drop it with --format gguf")
    elif args.outtype is not None:
        parser.error("--outtype applies to --format gguf only; add --format gguf or drop --outtype")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.format == "gguf":
        print(_gguf_summary(run_command("mora-train-export", lambda: _export_gguf(args))))
        return

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
            dtype=args.dtype,
            uniform_rank=args.uniform_rank,
        )

    report = run_command("mora-train-export", work)
    print(_summary(report, args.out_dir))


def _export_gguf(args: argparse.Namespace) -> dict[str, Any]:
    from mora_train.pipeline.gguf_export import export_gguf

    return export_gguf(args.source, args.out_dir, outtype=args.outtype, check=not args.no_check)


def _gguf_summary(report: dict[str, Any]) -> str:
    types = ", ".join(f"{count} {name}" for name, count in sorted(report["tensor_types"].items()))
    lines = [
        (
            f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, {report['architecture']}, {report['outtype']}: "
            f"{types} tensors; tokenizer pre-split {report['tokenizer_pre']}) in {report['export_time_s']:.1f} s"
        ),
    ]
    check = report.get("check")
    if check:
        lines.append(
            f"transformers reads it back: max |logit difference| {check['max_abs_diff']:.2e} against the merged "
            f"model with the file's rounding (tolerance {check['tolerance']:.0e}); {check['outtype_max_abs_diff']:.2e}"
            f" against the merged model itself (the cost of {report['outtype']}; logits up to "
            f"{check['max_abs_logit']:.1f})"
        )
        if check["tokenizer_matches"] is None:
            lines.append(
                f"tokenizer: not compared (transformers' GGUF reader does not implement the {report['tokenizer_pre']}"
                " pre-tokenizer; llama.cpp does)"
            )
    folder = report["path"].rsplit("/", 1)[0]
    lines.append(
        f"llama.cpp: llama-cli -m {report['path']} -p PROMPT; Ollama: ollama create NAME -f {folder}/Modelfile"
    )
    return "\n".join(lines)


def _summary(report: dict[str, Any], out_dir: str) -> str:
    """What was exported and how exact it is, the plain-peft check and evaluation if run, and how to serve it."""
    ranks = report["exported_ranks"]
    if len(ranks) == 1:
        shape = f"rank {report['rank']}"
    elif report["uniform_rank"]:
        shape = f"rank {report['rank']}, every layer zero-padded to it"
    else:
        shape = f"ranks {ranks[0]}..{ranks[-1]}, each layer its own (rank_pattern)"
    lines = [
        (
            f"exported {report['layers']} layers as LoRA ({shape}, {report['dtype']}, {report['lora_params']:,} "
            f"parameters) to {out_dir}: {report['how']}"
        ),
        (
            f"relative Frobenius error of ΔW: max {report['max_relative_error']:.2e}, mean "
            f"{report['mean_relative_error']:.2e} (per layer: {out_dir}/export_report.md)"
        ),
    ]
    if "peft_max_abs_logit_diff" in report:
        lines.append(f"plain peft check: max |logit difference| {report['peft_max_abs_logit_diff']:.2e}")
    if "evaluation" in report:
        ev = report["evaluation"]
        lines.append(
            f"{ev['metric']}: adapter {ev['adapter']:.4f} -> exported LoRA {ev['exported_lora']:.4f} "
            f"(evaluation files: {ev['folder']})"
        )
    lines += _serving_lines(report, out_dir)
    return "\n".join(lines)


def _serving_lines(report: dict[str, Any], out_dir: str) -> list[str]:
    serve = report["vllm_max_lora_rank"]
    if serve is not None:
        per_layer = len(report["exported_ranks"]) > 1 and not report["uniform_rank"]
        sglang = " (SGLang takes one rank per adapter: export with --uniform-rank for it)" if per_layer else ""
        return [f"serve: vllm serve BASE --enable-lora --max-lora-rank {serve} --lora-modules NAME={out_dir}{sglang}"]
    lines = [
        (
            f"warning: rank {report['rank']} is above vLLM's largest --max-lora-rank (512): peft serves this folder, "
            "vLLM does not"
        )
    ]
    fit = report.get("rank_limit_fit")
    if fit:
        energy = (
            f"--energy {fit['energy']} (max relative error of ΔW {fit['energy_max_relative_error']:.2e}) or "
            if fit["energy"] is not None
            else ""
        )
        lines.append(
            f"to serve it with vLLM, export again with {energy}--rank {fit['limit']} (max relative error of ΔW "
            f"{fit['rank_max_relative_error']:.2e}); both fit --max-lora-rank {fit['limit']}"
        )
    return lines


if __name__ == "__main__":
    main()

"""`mora-train-generate`: answer a JSONL of {adapter, prompt} requests with many LoRA adapters on one base."""

from __future__ import annotations

import argparse
from pathlib import Path

from mora_train.core.errors import positive_int, run_command


def _adapter(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=FOLDER, e.g. math=exported/math")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mora-train-generate",
        description="Load K exported LoRA adapters (mora-train-export) onto one base model and answer requests "
        "whose rows use different adapters in the same batch (greedy decoding).",
        epilog="Example: mora-train-generate --base-model smollm2-135m --adapter a=exp/a --adapter b=exp/b "
        '--input requests.jsonl --output answers.jsonl   (requests: {"adapter": "a", "prompt": "..."} per line; '
        "adapter null = the base model)",
    )
    parser.add_argument("--base-model", required=True, help="config name (smollm2-135m), Hub id or model folder")
    parser.add_argument("--adapter", action="append", type=_adapter, default=[], metavar="NAME=FOLDER")
    # Plain strings, not Path: Path("") is ".", and an empty --output must be refused, not taken for the current folder.
    parser.add_argument("--input", required=True, help="JSONL of {adapter, prompt}")
    parser.add_argument(
        "--output",
        required=True,
        help="JSONL of {adapter, prompt, completion}: a new file, or one this command wrote before "
        "(never --input, nor a file inside an adapter folder)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    args = parser.parse_args(argv)

    def work():  # the pipeline is imported here, so that --help stays fast (no torch import)
        from mora_train.pipeline.generate import run_generate

        return run_generate(
            args.base_model, dict(args.adapter), args.input, args.output, args.max_new_tokens, args.batch_size
        )

    results = run_command("mora-train-generate", work)
    print(f"{len(results)} completions from {len({r['adapter'] for r in results})} adapters -> {args.output}")


if __name__ == "__main__":
    main()

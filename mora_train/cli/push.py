"""`mora-train-push SOURCE REPO_ID --what merged|adapter|lora|gguf [--private] [--revision REV] [--dry-run]`: a run's
merged model, adapter or export folder published on the Hugging Face Hub with its model card
(mora_train.pipeline.push)."""

from __future__ import annotations

import argparse

from mora_train.core.errors import run_command
from mora_train.core.run_dir import RunDir

# export.card.CARD_KINDS, spelt here so that --help imports no torch (mora_train.export loads it)
KINDS = (RunDir.MERGED, RunDir.ADAPTER, "lora", "gguf")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-train-push",
        description=(
            "Publish what a run made on the Hugging Face Hub, model card included, in one commit: its merged model "
            "or its adapter (SOURCE: the run dir), or a folder mora-train-export wrote (SOURCE: that folder). The "
            "token is huggingface_hub's own (HF_TOKEN or `hf auth login`); the repo is created when missing."
        ),
        epilog="Example: mora-train-push outputs/DATE/TIME your-name/smollm2-mora-uuid --what merged --dry-run",
    )
    parser.add_argument("source", help="a run dir (merged, adapter) or the folder to push (an export folder)")
    parser.add_argument("repo_id", help="the Hub model repo, NAMESPACE/NAME (created when missing)")
    parser.add_argument(
        "--what",
        choices=KINDS,
        required=True,
        help="merged: RUN_DIR/merged; adapter: RUN_DIR/adapter; lora / gguf: a folder mora-train-export wrote",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its)")
    parser.add_argument("--revision", help="push to this branch (created from main when missing); default main")
    parser.add_argument(
        "--dry-run", action="store_true", help="list every file with its size and print the card; send nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)

    def work() -> str:  # the pipeline is imported here, so that --help stays fast
        from mora_train.pipeline.push import push_run

        return push_run(args.source, args.repo_id, args.what, args.private, args.revision, args.dry_run)

    print(run_command("mora-train-push", work))


if __name__ == "__main__":
    main()

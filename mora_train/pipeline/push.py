"""`mora-train-push`: a folder a run made, published as a Hugging Face Hub model repo in one commit.

1. Find the folder: a run dir's merged/ or adapter/, or a folder `mora-train-export` wrote (PEFT LoRA, GGUF); a folder
   that is not there is refused naming the command that makes it.
2. Plan the upload: every file with its size, and the model card as it will be uploaded (its folder placeholder
   replaced by the repo id, export/card.card_for_repo; a run from before cards gets one made from its facts).
   `--dry-run` prints the plan and stops: nothing is read from or sent to the network.
3. Check the Hub before anything is sent: not offline, a token (huggingface_hub's own: HF_TOKEN or `hf auth login`),
   the token valid (whoami), the repo created or already there (create_repo(exist_ok=True)), the branch there.
   Any failure here is one paragraph and nothing is uploaded.
4. Upload: one create_commit of every file, the card as uploaded given as bytes, so the run's own folder is never
   changed (its checksums stay valid). Not upload_folder: with hf_xet installed it commits a large or slow upload in
   several parts, and an interruption would leave some of them in the repo. Run again, a push sends only what the
   Hub does not hold yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.core.errors import MoraTrainError
from mora_train.core.run_dir import RunDir
from mora_train.core.run_lock import refuse_if_being_written
from mora_train.export.card import ADAPTER, CARD_KINDS, GGUF, LORA, MERGED, card_for_repo, model_card_text
from mora_train.export.card import read_card_facts as recorded_facts
from mora_train.training.resilience import format_bytes

PROGRAM = "mora-train-push"
HUB = "https://huggingface.co"


@dataclass
class PushPlan:
    """What a push sends: the folder, the repo and branch, each file with its size, and the model card."""

    folder: Path
    what: str
    repo_id: str
    private: bool
    revision: str | None
    files: list[tuple[str, int]]  # path inside the folder (and the repo), size in bytes
    card: str | None  # README.md as uploaded; None: the folder has none and none can be made

    @property
    def url(self) -> str:
        return f"{HUB}/{self.repo_id}" + (f"/tree/{self.revision}" if self.revision else "")


def _holds_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _peft_type(folder: Path) -> str | None:
    try:
        saved = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get("peft_type") if isinstance(saved, dict) else None


def _export_missing(source: Path, kind: str, what: str, make: str) -> MoraTrainError:
    return MoraTrainError(
        f"{source} holds no {what} to push. A {what} is a folder of its own: make it with `{make}`, then push that "
        f"folder: `{PROGRAM} OUT_DIR REPO_ID --what {kind}`"
    )


def find_folder(source: Path, what: str) -> Path:
    """The folder `--what` names for SOURCE (a run dir, or the folder itself); a clear error naming the command that
    makes it when it is not there."""
    if not source.exists():
        raise MoraTrainError(f"{source} does not exist; give a run dir (RUN_DIR) or the folder to push")
    run = RunDir(source)
    if what == MERGED:
        if _holds_weights(source):
            return source
        if _holds_weights(run.merged):
            return run.merged
        if run.merged_unverified.is_dir():
            raise MoraTrainError(
                f"{source} failed its merge check: its merged model is kept as {run.merged_unverified} for inspection "
                f"and is not pushed. Push the adapter instead (`{PROGRAM} {source} REPO_ID --what adapter`), or "
                "export it as LoRA (`mora-train-export`)"
            )
        raise MoraTrainError(
            f"{source} has no merged model ({run.merged} with config.json and weights): `mora-train` writes it at "
            "the end of a run; give a finished run dir, or the merged folder itself"
        )
    if what == ADAPTER:
        for folder in (source, run.adapter):
            if (folder / ADAPTER_CONFIG_NAME).is_file():
                return folder
        raise MoraTrainError(
            f"{source} has no adapter folder ({run.adapter} with {ADAPTER_CONFIG_NAME}): `mora-train` writes it at "
            "the end of a run, except for full fine-tuning of every weight, whose merged model is the whole result "
            f"(`{PROGRAM} {source} REPO_ID --what merged`)"
        )
    if what == LORA:
        if _peft_type(source) == "LORA":
            return source
        raise _export_missing(source, LORA, "PEFT LoRA export", f"mora-train-export {source} OUT_DIR")
    if any(source.glob("*.gguf")):
        return source
    raise _export_missing(source, GGUF, "GGUF export", f"mora-train-export {source} OUT_DIR --format gguf")


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """Every file upload_folder sends from `folder` (its own default ignore patterns: .git/, .cache/huggingface/)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    found = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    kept = filter_repo_objects(list(found), ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [(name, found[name].stat().st_size) for name in kept]


def _card_text(source: Path, folder: Path, what: str) -> str | None:
    card = folder / RunDir.MODEL_CARD
    if card.is_file():
        return card.read_text(encoding="utf-8")
    facts = recorded_facts(source) if folder.parent == source else None
    return model_card_text(facts, what) if facts is not None and what in (MERGED, ADAPTER) else None


def plan_push(
    source: str | Path, repo_id: str, what: str, private: bool = False, revision: str | None = None
) -> PushPlan:
    """Everything a push needs, found and checked offline."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if what not in CARD_KINDS:
        raise MoraTrainError(f"--what {what} is unknown; use one of {', '.join(CARD_KINDS)}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise MoraTrainError(
            f"REPO_ID {repo_id!r} is not a Hugging Face Hub repo id ({err}); give NAMESPACE/NAME, e.g. "
            "your-user/smollm2-mora-uuid"
        ) from None
    refuse_if_being_written(source, "SOURCE", PROGRAM)
    source = Path(source).expanduser()
    folder = find_folder(source, what)
    files = folder_files(folder)
    if not files:
        raise MoraTrainError(f"{folder} holds no files to push")
    card = _card_text(source, folder, what)
    if card is not None:
        card = card_for_repo(card, repo_id)
        size = len(card.encode("utf-8"))
        files = [(n, s) for n, s in files if n != RunDir.MODEL_CARD] + [(RunDir.MODEL_CARD, size)]
        files.sort()
    return PushPlan(folder, what, repo_id, private, revision, files, card)


def describe(plan: PushPlan) -> str:
    """The dry run's report: where it would go, every file with its size, and the card as it would be uploaded."""
    visibility = "private" if plan.private else "public unless the repo exists or your account makes it private"
    width = max(len(name) for name, _ in plan.files)
    lines = [
        f"would push {plan.folder} ({plan.what}) to {plan.url} (branch {plan.revision or 'main'}; {visibility}):",
        *(f"  {name:<{width}}  {format_bytes(size):>10}" for name, size in plan.files),
        f"{len(plan.files)} files, {format_bytes(sum(size for _, size in plan.files))}",
    ]
    if plan.card is None:
        lines.append(f"no model card: {plan.folder} has no {RunDir.MODEL_CARD} (a run from before cards)")
    else:
        lines += [f"--- {RunDir.MODEL_CARD} as uploaded ---", plan.card.rstrip("\n"), "---"]
    return "\n".join(lines)


def push(plan: PushPlan, api: Any = None) -> str:
    """Check the Hub, then upload the plan in one commit; return the commit's URL."""
    from mora_train.pipeline.push_hub import checked_hub, upload

    api, token = checked_hub(plan, api)
    return upload(api, token, plan)


def push_run(
    source: str | Path,
    repo_id: str,
    what: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
) -> str:
    """`mora-train-push`'s job: the dry run's report, or what was pushed where."""
    plan = plan_push(source, repo_id, what, private, revision)
    if dry_run:
        return describe(plan)
    url = push(plan)
    total = format_bytes(sum(size for _, size in plan.files))
    return f"pushed {plan.folder} ({plan.what}, {len(plan.files)} files, {total}) to {plan.url}\ncommit: {url}"

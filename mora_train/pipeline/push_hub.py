"""mora-train-push's conversation with the Hugging Face Hub (huggingface_hub's HfApi): every check before the upload,
then the upload in one commit (create_commit). Each failure is one paragraph naming what failed and the fix;
nothing is uploaded when a check fails."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mora_train.core.errors import MoraTrainError

if TYPE_CHECKING:
    from mora_train.pipeline.push import PushPlan

NOTHING_SENT = "Nothing was uploaded."
DRY_RUN = "`--dry-run` shows what would be pushed without the network."


def _reason(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def checked_hub(plan: PushPlan, api: Any = None) -> tuple[Any, str]:
    """(the HfApi, the token) once the Hub is reachable, the token valid, and the repo and branch exist (made when
    missing). Raises MoraTrainError before anything is uploaded otherwise."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise MoraTrainError(
            "cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1 is "
            f"set). {NOTHING_SENT} Unset it where the Hub is reachable and run the command again; {DRY_RUN}"
        )
    token = huggingface_hub.get_token()
    if not token:
        raise MoraTrainError(
            "cannot push to the Hugging Face Hub: no token found. Log in with `hf auth login`, or set HF_TOKEN to a "
            f"token with write access (https://huggingface.co/settings/tokens), then run the command again. "
            f"{NOTHING_SENT} {DRY_RUN}"
        )
    api = api or huggingface_hub.HfApi()
    user = _whoami(api, token)
    _open_repo(api, token, plan, user)
    return api, token


def _whoami(api: Any, token: str) -> str:
    try:
        info = api.whoami(token=token)
    except Exception as err:  # noqa: BLE001 - network, TLS, proxy, HTTP 401: each is the same "cannot start" here
        raise MoraTrainError(
            f"cannot push to the Hugging Face Hub at {api.endpoint}: checking the token failed ({_reason(err)}). "
            "Check the network (and HF_ENDPOINT, if set) and that the token is valid (`hf auth whoami`; a new one: "
            f"`hf auth login`). {NOTHING_SENT} {DRY_RUN}"
        ) from None
    return str(info.get("name", "?")) if isinstance(info, dict) else "?"


def _open_repo(api: Any, token: str, plan: PushPlan, user: str) -> None:
    try:
        api.create_repo(plan.repo_id, token=token, private=True if plan.private else None, exist_ok=True)
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, token=token, exist_ok=True)
    except Exception as err:  # noqa: BLE001 - permissions, a name taken by another repo type, network: one paragraph
        where = f"repo {plan.repo_id}" + (f" (branch {plan.revision})" if plan.revision else "")
        raise MoraTrainError(
            f"cannot create or open the {where} on the Hugging Face Hub as {user} ({_reason(err)}). A repo in "
            "another namespace needs a token with write access to it (https://huggingface.co/settings/tokens). "
            f"{NOTHING_SENT}"
        ) from None


def operations(plan: PushPlan) -> list[Any]:
    """One CommitOperationAdd per file: the folder's files by path, the card as uploaded by its bytes."""
    from huggingface_hub import CommitOperationAdd

    from mora_train.core.run_dir import RunDir

    return [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.card.encode("utf-8"))
        if name == RunDir.MODEL_CARD and plan.card is not None
        else CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.folder / name))
        for name, _ in plan.files
    ]


def upload(api: Any, token: str, plan: PushPlan) -> str:
    """Every file in one commit (create_commit uploads the large files first, then commits them all at once);
    return the commit's URL."""
    try:
        commit = api.create_commit(
            repo_id=plan.repo_id,
            operations=operations(plan),
            commit_message=f"Upload {plan.what} from mora-train",
            revision=plan.revision,
            token=token,
        )
    except Exception as err:  # noqa: BLE001 - whatever stopped the upload, the repo did not get a partial commit
        raise MoraTrainError(
            f"the upload of {plan.folder} to {plan.url} failed ({_reason(err)}). The files go up in one commit, so "
            "the repo holds none of them unless that commit landed; run the same command again to finish (files "
            "already sent are not sent twice)"
        ) from None
    return str(getattr(commit, "commit_url", None) or plan.url)

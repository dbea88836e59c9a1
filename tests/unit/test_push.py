"""`mora-train-push`: the dry run lists the files and prints the card without the network; the real path checks the
Hub before sending anything and fails with one paragraph offline; a (faked) upload sends the folder in one commit
with the card naming the repo, and never changes the run's own folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from mora_train.cli.push import KINDS, main
from mora_train.core.errors import MoraTrainError
from mora_train.export.card import CARD_KINDS, FOLDER_PLACEHOLDER, write_card_facts, write_model_card
from mora_train.pipeline.push import push_run
from tests.unit.test_model_cards import facts

REPO = "me/tiny-mora"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run's outputs as push reads them: merged/ and adapter/ with their cards, and the card facts."""
    run = tmp_path / "run"
    merged, adapter = run / "merged", run / "adapter"
    merged.mkdir(parents=True)
    adapter.mkdir()
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "model.safetensors").write_bytes(b"\x00" * 3000)
    (adapter / "adapter_config.json").write_text('{"format": "mora-train", "adapter": "mora", "rank": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01" * 1200)
    write_model_card(merged, facts(), "merged")
    write_model_card(adapter, facts(), "adapter")
    write_card_facts(run, facts())
    return run


def test_the_command_offers_every_card_kind() -> None:
    assert KINDS == CARD_KINDS


class NoNetwork:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dry run must not touch the Hub")


def test_dry_run_lists_every_file_and_prints_the_card_offline(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    main([str(run_dir), REPO, "--what", "merged", "--dry-run", "--private"])
    out = capsys.readouterr().out
    assert f"would push {run_dir / 'merged'} (merged) to https://huggingface.co/{REPO} (branch main; private)" in out
    assert re.search(r"^  model\.safetensors +2\.9 KB$", out, flags=re.MULTILINE), out
    assert re.search(r"^  config\.json +\d+ B$", out, flags=re.MULTILINE) and "\n  README.md " in out
    assert "3 files, " in out
    card = out.split("--- README.md as uploaded ---\n", 1)[1].rsplit("\n---", 1)[0]
    parsed = ModelCard(card)
    assert parsed.data.library_name == "transformers" and parsed.data.base_model == facts().base_model
    assert f'from_pretrained("{REPO}")' in card and FOLDER_PLACEHOLDER not in card


class FakeHub:
    """HfApi's calls that a push makes, recorded; create_commit reads each operation's content."""

    calls: list[tuple[str, dict[str, Any]]]
    fail: str | None = None
    uploaded: dict[str, bytes]

    def __init__(self) -> None:
        self.endpoint = "https://huggingface.co"

    def _record(self, name: str, **kwargs: Any) -> None:
        FakeHub.calls.append((name, kwargs))
        if FakeHub.fail == name:
            raise PermissionError(f"403 Forbidden: {name} refused")  # what the client's HTTP errors say, in short

    def whoami(self, token: str) -> dict[str, str]:
        self._record("whoami", token=token)
        return {"name": "me"}

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self._record("create_repo", repo_id=repo_id, **kwargs)

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self._record("create_branch", repo_id=repo_id, **kwargs)

    def create_commit(self, **kwargs: Any) -> Any:
        self._record("create_commit", **kwargs)
        FakeHub.uploaded = {}
        for op in kwargs["operations"]:  # CommitOperationAdd: a path on disk, or the bytes of the uploaded card
            given = op.path_or_fileobj
            FakeHub.uploaded[op.path_in_repo] = given if isinstance(given, bytes) else Path(given).read_bytes()
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="abc123",
        )


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    FakeHub.calls, FakeHub.fail, FakeHub.uploaded = [], None, {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token_of_me")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def test_a_push_checks_the_hub_then_uploads_the_folder_in_one_commit(run_dir: Path, hub: type[FakeHub]) -> None:
    before = {p.name: p.read_bytes() for p in (run_dir / "adapter").iterdir()}
    said = push_run(run_dir, REPO, "adapter", private=True, revision="mora-r8")
    assert [name for name, _ in hub.calls] == ["whoami", "create_repo", "create_branch", "create_commit"]
    calls = dict(hub.calls)
    assert calls["whoami"] == {"token": "hf_token_of_me"}
    assert calls["create_repo"] == {"repo_id": REPO, "token": "hf_token_of_me", "private": True, "exist_ok": True}
    assert calls["create_branch"] == {"repo_id": REPO, "branch": "mora-r8", "token": "hf_token_of_me", "exist_ok": True}
    upload = calls["create_commit"]  # one commit holding every file
    assert upload["repo_id"] == REPO and upload["revision"] == "mora-r8" and upload["token"] == "hf_token_of_me"
    assert set(hub.uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert hub.uploaded["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    card = hub.uploaded["README.md"].decode()
    assert f'folder = "{REPO}"' in card and ModelCard(card).data.library_name == "mora-train"
    # The run's own folder is untouched (its checksums stay valid): the repo id went into the uploaded card only.
    assert {p.name: p.read_bytes() for p in (run_dir / "adapter").iterdir()} == before
    assert f"https://huggingface.co/{REPO}/commit/abc123" in said and "3 files" in said


def test_a_public_push_to_main_leaves_visibility_to_the_hub(run_dir: Path, hub: type[FakeHub]) -> None:
    push_run(run_dir, REPO, "merged")
    calls = dict(hub.calls)
    assert "create_branch" not in calls and calls["create_repo"]["private"] is None
    assert calls["create_commit"]["revision"] is None


@pytest.mark.parametrize(
    "failing,said",
    [
        ("whoami", "checking the token failed (PermissionError: 403 Forbidden: whoami refused)"),
        ("create_repo", "open the repo me/tiny-mora on the Hugging Face Hub as me (PermissionError: 403 Forbidden"),
        ("create_commit", "failed (PermissionError: 403 Forbidden: create_commit refused). The files go up in one"),
    ],
)
def test_a_refused_step_is_one_paragraph_and_nothing_after_it_runs(
    failing: str, said: str, run_dir: Path, hub: type[FakeHub]
) -> None:
    hub.fail = failing
    with pytest.raises(MoraTrainError, match=re.escape(said)) as err:
        push_run(run_dir, REPO, "merged")
    assert [name for name, _ in hub.calls][-1] == failing  # nothing ran after the step that failed
    assert "\n" not in str(err.value)
    if failing != "create_commit":
        assert "Nothing was uploaded." in str(err.value) and hub.uploaded == {}


def test_without_a_token_nothing_is_sent(run_dir: Path, hub: type[FakeHub], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(MoraTrainError, match=r"no token found\. Log in with `hf auth login`, or set HF_TOKEN"):
        push_run(run_dir, REPO, "merged")
    assert hub.calls == []


def test_offline_mode_is_refused_before_any_request(
    run_dir: Path, hub: type[FakeHub], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), REPO, "--what", "merged"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and hub.calls == []
    assert err.startswith("mora-train-push: error: cannot push to the Hugging Face Hub: offline mode is on")
    assert "Nothing was uploaded." in err and "--dry-run" in err and "Traceback" not in err


@pytest.mark.integration  # starts interpreters: the Hub client reads HF_HUB_OFFLINE and HF_ENDPOINT at import
def test_the_real_client_offline_or_unreachable_fails_cleanly(run_dir: Path, tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    base["HF_HOME"] = str(tmp_path / "hf-home")  # no stored token of this machine
    command = [sys.executable, "-m", "mora_train.cli.push", str(run_dir), REPO, "--what", "merged"]
    offline = subprocess.run(command, env={**base, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert offline.returncode == 2 and "offline mode is on" in offline.stderr, offline.stderr
    unreachable = {**base, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token"}
    refused = subprocess.run(command, env=unreachable, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "cannot push to the Hugging Face Hub at http://127.0.0.1:9: checking the token failed" in refused.stderr
    assert "Nothing was uploaded." in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "what,said",
    [
        ("lora", r"holds no PEFT LoRA export to push.*`mora-train-export .*run OUT_DIR`.*--what lora`"),
        ("gguf", r"holds no GGUF export to push.*`mora-train-export .*run OUT_DIR --format gguf`"),
    ],
)
def test_an_export_not_made_yet_names_the_command_that_makes_it(what: str, said: str, run_dir: Path) -> None:
    with pytest.raises(MoraTrainError, match=said):
        push_run(run_dir, REPO, what, dry_run=True)


def test_export_folders_and_missing_outputs(run_dir: Path, tmp_path: Path) -> None:
    lora = tmp_path / "exported"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (lora / "adapter_model.safetensors").write_bytes(b"\x02" * 10)
    assert "(lora)" in push_run(lora, REPO, "lora", dry_run=True)
    assert "no model card" in push_run(lora, REPO, "lora", dry_run=True)  # written by an export from before cards
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-f16.gguf").write_bytes(b"GGUF")
    assert "model-f16.gguf" in push_run(gguf, REPO, "gguf", dry_run=True)
    (run_dir / "adapter" / "README.md").unlink()  # a run from before cards: its card is made from its facts
    assert "--- README.md as uploaded ---" in push_run(run_dir, REPO, "adapter", dry_run=True)
    os.rename(run_dir / "merged", run_dir / "merged-unverified")
    with pytest.raises(MoraTrainError, match="failed its merge check"):
        push_run(run_dir, REPO, "merged", dry_run=True)
    for path in (run_dir / "adapter").iterdir():
        path.unlink()
    with pytest.raises(MoraTrainError, match=r"no adapter folder.*full fine-tuning"):
        push_run(run_dir, REPO, "adapter", dry_run=True)
    with pytest.raises(MoraTrainError, match="does not exist"):
        push_run(tmp_path / "nowhere", REPO, "merged", dry_run=True)
    with pytest.raises(MoraTrainError, match="REPO_ID 'not a repo' is not a Hugging Face Hub repo id"):
        push_run(run_dir, "not a repo", "merged", dry_run=True)

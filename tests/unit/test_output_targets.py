"""Never destructive: every command that writes a path the user named refuses a target it must not write
(mora_train.core.outputs), before any model loads, and leaves the files there untouched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mora_train.core.errors import MoraTrainError
from mora_train.core.outputs import FILE, FILES, FOLDER, holds_file, output_target_problem


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A source folder with a file, a foreign non-empty folder, an empty one, a plain file, a symlink to the source."""
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "weights.bin").write_bytes(b"w" * 10)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "plain.txt").write_text("a file")
    (tmp_path / "link").symlink_to(source)
    return {"source": source, "foreign": foreign, "root": tmp_path}


FOLDER_CASES = [  # (target relative to tmp_path, refused?, words of the message)
    ("", True, "is empty"),
    ("   ", True, "is empty"),
    ("new/out", False, None),
    ("empty", False, None),
    ("plain.txt", True, "is an existing file"),
    ("plain.txt/out", True, "is a file, so nothing can be created under it"),
    ("foreign", True, "not written by"),
    ("source", True, "itself"),
    ("source/sub", True, "is inside"),
    ("link/new", True, "is inside"),  # through a symlink, still inside the source
    (".", True, "holds"),  # the source is inside the target, which is replaced whole
]


@pytest.mark.parametrize("relative, refused, words", FOLDER_CASES)
def test_a_folder_replaced_whole(places: dict[str, Path], relative: str, refused: bool, words: str | None) -> None:
    root = places["root"]
    target = relative if not relative.strip() else str(root / relative)
    before = snapshot(root)
    problem = output_target_problem(target, "mora-train-export", "OUT_DIR", FOLDER, [places["source"]])
    assert (problem is not None) == refused, problem
    if refused:
        assert words in problem and "OUT_DIR" in problem
        assert (relative.strip() == "" and repr(relative) in problem) or target in problem
    assert snapshot(root) == before  # a check never writes


def test_a_folder_this_command_wrote_may_be_replaced(places: dict[str, Path]) -> None:
    ours = places["root"] / "exported"
    ours.mkdir()
    (ours / "export_report.json").write_text("{}")
    (ours / "adapter_config.json").write_text("{}")
    assert (
        output_target_problem(
            ours, "mora-train-export", "OUT_DIR", FOLDER, [places["source"]], holds_file("export_report.json")
        )
        is None
    )
    # The same rule without the provenance file: a foreign folder.
    assert "not written by" in output_target_problem(
        places["foreign"], "mora-train-export", "OUT_DIR", FOLDER, [], holds_file("export_report.json")
    )


def test_a_file_target(places: dict[str, Path]) -> None:
    root = places["root"]
    requests = root / "requests.jsonl"
    requests.write_text('{"adapter": null, "prompt": "hi"}\n')

    def problem(target, ours=lambda p: False):
        return output_target_problem(
            target, "mora-train-generate", "--output", FILE, [requests, places["source"]], ours
        )

    assert "itself" in problem(requests)
    assert "is inside" in problem(places["source"] / "answers.jsonl")
    assert "is a folder" in problem(places["foreign"])
    assert "already exists and was not written by" in problem(root / "plain.txt")
    assert problem(root / "plain.txt", ours=lambda p: True) is None
    assert "not a regular file" in problem("/dev/null")
    assert problem(root / "answers.jsonl") is None
    (root / "empty.jsonl").write_text("")
    assert problem(root / "empty.jsonl") is None  # an empty file holds nothing to lose


def test_files_written_into_a_folder_clash_only_with_files_of_their_names(places: dict[str, Path]) -> None:
    foreign = places["foreign"]

    def problem(target, ours=lambda p: False):
        return output_target_problem(
            target, "mora-train-report", "--out", FILES, [places["source"]], ours, names=["report.md", "report.csv"]
        )

    assert problem(foreign) is None  # notes.txt stays: nothing of the report's names is there
    (foreign / "report.md").write_text("my own report")
    assert "already holds report.md" in problem(foreign)
    assert problem(foreign, ours=lambda p: True) is None
    assert "is inside" in problem(places["source"] / "sub")


# -- the commands ----------------------------------------------------------------------------------------------


def fake_run_dir(root: Path) -> Path:
    """A finished run's adapter/ with checksums.json (no training: every refusal comes before a model loads)."""
    from mora_train.pipeline.run_dir import write_output_checksums

    run_dir = root / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"adapter": "lora"}))
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights" * 10)
    (run_dir / "resolved_config.yaml").write_text("model: {name_or_path: null}\n")
    write_output_checksums(run_dir)
    return run_dir


def export_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from mora_train.cli.export import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    return int(stop.value.code), capsys.readouterr().err


def test_export_into_a_foreign_non_empty_folder_exits_2_and_touches_nothing(tmp_path: Path, capsys) -> None:
    run_dir = fake_run_dir(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "adapter_config.json").write_text("my config")
    (out / "notes.md").write_text("my notes")
    before = snapshot(out)
    code, err = export_cli([str(run_dir), str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"OUT_DIR {out} is a folder that already holds files not written by mora-train-export" in err
    assert "adapter_config.json, notes.md" in err and "move those files away" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["adapter", "run dir", "inside"])
def test_export_into_the_runs_own_folders_is_refused_and_its_checksums_still_match(
    tmp_path: Path, capsys, where: str
) -> None:
    from mora_train.pipeline.evaluate import verify_outputs

    run_dir = fake_run_dir(tmp_path)
    before = snapshot(run_dir)
    target = {"adapter": run_dir / "adapter", "run dir": run_dir, "inside": run_dir / "exported"}[where]
    # (RUN/adapter exported into RUN/exported is allowed: it changes nothing the export reads)
    for source in (run_dir, run_dir / "adapter") if where != "inside" else (run_dir,):
        code, err = export_cli([str(source), str(target)], capsys)
        assert code == 2 and str(target) in err and "mora-train-export reads" in err, err
    assert snapshot(run_dir) == before
    assert verify_outputs(run_dir, "adapter") is None


def test_export_twice_into_its_own_folder_replaces_it(tmp_path: Path) -> None:
    import torch

    from mora_train.adapters import build_adapter
    from mora_train.models import load_model_and_tokenizer
    from mora_train.pipeline.lora_export import export_run
    from tests.conftest import typed_config

    cfg = typed_config(["model=tiny-llama", "adapter=lora", "rank=2"])
    adapter = build_adapter(load_model_and_tokenizer(cfg.model)[0], cfg.adapter, cfg.rank)
    with torch.no_grad():
        for param in adapter.trainable_parameters().values():
            param.normal_(0, 0.05)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    adapter.save(adapter_dir)
    out = tmp_path / "exported"
    first = export_run(adapter_dir, out, base_model="tiny-llama", check=False)
    (out / "stale.txt").write_text("left by the first export's user")  # a folder the export wrote: replaced whole
    second = export_run(adapter_dir, out, base_model="tiny-llama", check=False, rank=1, evaluate=False)
    assert first["rank"] == 2 and second["rank"] == 1
    assert not (out / "stale.txt").exists() and (out / "export_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "exported"]  # no temporary left


def generate_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from mora_train.cli.generate import main

    with pytest.raises(SystemExit) as stop:
        main(["--base-model", "tiny-llama", *args])
    return int(stop.value.code), capsys.readouterr().err


def test_generate_never_overwrites_its_input_an_adapter_or_a_foreign_file(tmp_path: Path, capsys) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"adapter": "a", "prompt": "key 1 ->"}\n')
    adapter = tmp_path / "exported"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    foreign = tmp_path / "results.jsonl"
    foreign.write_text('{"score": 1}\n')
    before = snapshot(tmp_path)
    cases = [
        (str(requests), f"--output {requests} is {requests} itself"),
        (str(adapter / "answers.jsonl"), "is inside"),
        (str(foreign), "already exists and was not written by mora-train-generate"),
        ("", "--output is empty"),
        (" ", "--output is empty"),
    ]
    for output, message in cases:
        code, err = generate_cli(["--adapter", f"a={adapter}", "--input", str(requests), "--output", output], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_generate_may_replace_answers_it_wrote(tmp_path: Path) -> None:
    from mora_train.pipeline.generate import is_earlier_answers

    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"adapter": "a", "prompt": "p", "completion": "c"}\n')
    assert is_earlier_answers(answers)
    answers.write_text('{"adapter": "a", "prompt": "p"}\n')
    assert not is_earlier_answers(answers)


def test_report_never_overwrites_a_foreign_report_nor_writes_into_a_run(tmp_path: Path, capsys) -> None:
    from mora_train.cli.report import main as report_main

    sweep = tmp_path / "sweep"
    (sweep / "0_run" / "adapter").mkdir(parents=True)
    (sweep / "0_run" / "error.json").write_text(json.dumps({"error_type": "ConfigError", "message": "x"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.md").write_text("my own report")
    before = snapshot(tmp_path)
    for out, message in [
        (elsewhere, "already holds report.md"),
        (sweep / "0_run" / "adapter", "itself, which mora-train-report reads"),
        ("", "--out is empty"),
    ]:
        assert report_main([str(sweep), "--no-spectrum", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    # Its own earlier report may be replaced; so may the sweep dir's (the default place).
    assert report_main([str(sweep), "--no-spectrum", "--out", str(tmp_path / "r")]) == 0
    assert report_main([str(sweep), "--no-spectrum", "--out", str(tmp_path / "r")]) == 0
    assert report_main([str(sweep), "--no-spectrum"]) == 0 and report_main([str(sweep), "--no-spectrum"]) == 0
    assert (elsewhere / "report.md").read_text() == "my own report"


def test_spectrum_out_is_checked_before_any_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    from mora_train.analysis import spectrum as spectrum_library
    from mora_train.cli import spectrum

    for module in (spectrum, spectrum_library):  # the command's direct call and the run dir's cached one
        monkeypatch.setattr(module, "run_spectrum", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    run_dir = fake_run_dir(tmp_path)
    foreign = tmp_path / "plots"
    foreign.mkdir()
    (foreign / "spectrum.png").write_bytes(b"my plot")
    for args, message in [
        ([str(run_dir), "--out", str(run_dir / "adapter" / "plots")], "is inside"),
        ([str(run_dir / "adapter"), "--base-model", "tiny-llama", "--out", str(run_dir / "adapter")], "itself"),
        ([str(run_dir), "--out", str(foreign)], "already holds spectrum.png"),
        ([str(run_dir), "--out", ""], "--out is empty"),
    ]:
        assert spectrum.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert (foreign / "spectrum.png").read_bytes() == b"my plot"
    assert sorted(os.listdir(run_dir / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_check_output_target_raises_the_projects_error(tmp_path: Path) -> None:
    from mora_train.core.outputs import check_output_target

    with pytest.raises(MoraTrainError, match="is empty") as err:
        check_output_target("", "mora-train-export", "OUT_DIR", FOLDER)
    assert err.value.exit_code == 2
    assert check_output_target(str(tmp_path / "x"), "mora-train-export", "OUT_DIR", FOLDER) == tmp_path / "x"

"""MoRA (and LoRA) adapters exported as plain PEFT LoRA folders: exactness, truncation, checks, mixed batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

from mora_train.adapters.mora.layer import MORA_TYPES, MoRALinear, mora_shape_problem
from mora_train.core.errors import MoraTrainError
from mora_train.export import check_with_peft, export_lora, truncate
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.generate import generate, load_many
from mora_train.pipeline.lora_export import export_run
from tests.conftest import TINY_RUN, compose_config
from tests.support.mora_export import peft_logits, random_mora_adapter

EXACT_TYPES = [t for t in MORA_TYPES if t not in ("rope", "decouple")]


@pytest.mark.parametrize("kind", list(MORA_TYPES))
@pytest.mark.parametrize("d_in, d_out, rank", [(64, 64, 4), (37, 100, 8), (100, 37, 8), (16, 48, 32), (24, 24, 64)])
def test_layer_lora_factors_reproduce_delta_w(kind: str, d_in: int, d_out: int, rank: int) -> None:
    if mora_shape_problem("layer", d_in, d_out, rank, kind):
        pytest.skip("a shape this type refuses")
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(d_in, d_out), rank, kind)
    with torch.no_grad():
        layer.mora_M.normal_()  # not the zero init: an exact export of zero proves nothing
    delta = layer.delta_weight().float()
    factors = layer.lora_factors()
    if kind in EXACT_TYPES:
        B, A = factors
        assert A.shape == (layer.r_hat, d_in) and B.shape == (d_out, layer.r_hat)
        assert set(torch.unique(B).tolist()) <= {0.0, 1.0}  # D is a fixed 0/1 decompression
        assert torch.allclose(B @ A, delta, atol=1e-5)
    else:
        assert factors is None  # chunked types: block-structured, exported through the SVD


@pytest.mark.parametrize("kind", list(MORA_TYPES))
def test_exported_lora_reproduces_the_mora_model(kind: str, tmp_path: Path) -> None:
    rank = 64 if kind == "sharing" else 8  # sharing at 64: r̂ = 91 > d_in = 64 for the 64x64 projections
    cfg, adapter = random_mora_adapter(kind, rank)
    rows = export_lora(adapter.lora_factors(), tmp_path / "lora")
    assert all(r.relative_error == 0.0 for r in rows)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]  # scaling exactly 1
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        expected = adapter.model.eval()(input_ids=ids).logits
    assert (peft_logits(cfg, tmp_path / "lora", ids) - expected).abs().max() < 1e-4


def test_truncated_export_error_falls_with_rank_and_vanishes_at_full_rank() -> None:
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(48, 64), 8, "rope")
    with torch.no_grad():
        layer.mora_M.normal_()
    delta = layer.delta_weight().float()
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    B, A = (U * S).float(), Vh.float()
    errors = []
    for k in (2, 8, 24, 48):
        Bk, Ak, error = truncate(B, A, rank=k)
        measured = ((Bk @ Ak - delta).norm() / delta.norm()).item()
        assert error == pytest.approx(measured, abs=1e-5)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1 and errors[-1] < 1e-6
    _, _, at_energy = truncate(B, A, energy=0.9)
    assert at_energy <= (0.1**0.5) + 1e-9  # keeps at least 90 % of the energy


@pytest.mark.integration  # starts an interpreter (the plain-peft check or the export CLI)
def test_bad_export_arguments_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mora_train.cli.export import main

    (tmp_path / "not-an-adapter").mkdir()
    cases = [
        ([str(tmp_path / "not-an-adapter"), str(tmp_path / "o1"), "--base-model", "tiny-llama"], "adapter folder"),
        ([str(tmp_path / "missing"), str(tmp_path / "o2")], "does not exist"),
        (
            [str(tmp_path / "not-an-adapter"), str(tmp_path / "o3"), "--rank", "0"],
            "--rank 0 must be a positive integer",
        ),
        ([str(tmp_path / "not-an-adapter"), str(tmp_path / "o4"), "--energy", "1.5"], "--energy 1.5 must be in (0, 1]"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, err
    # The installed command behaves the same in its own process (one case: each start imports torch).
    done = subprocess.run(
        [sys.executable, "-m", "mora_train.cli.export", str(tmp_path / "missing"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr, done.stderr


def _train(tmp_path: Path, name: str, *overrides: str) -> Path:
    from tests.conftest import run_pipeline as run

    run(compose_config([*TINY_RUN, "trainer.save_steps=0", *overrides], tmp_path / name))
    return tmp_path / name


@pytest.mark.integration  # starts an interpreter (the plain-peft check or the export CLI)
def test_run_exports_check_with_plain_peft_and_batches_mix_adapters(tmp_path: Path) -> None:
    sharing = _train(tmp_path, "sharing", "adapter=mora", "adapter.mora_type=sharing")
    lora = _train(tmp_path, "lora", "adapter=lora")
    exact = export_run(sharing, tmp_path / "exp-sharing")
    assert exact["max_relative_error"] == 0.0 and exact["peft_max_abs_logit_diff"] < 1e-4
    # each layer at its own r̂ (peft's rank_pattern), checked by plain peft in its own process like any export
    saved = json.loads((tmp_path / "exp-sharing" / "adapter_config.json").read_text())
    assert len(exact["exported_ranks"]) > 1 and saved["rank_pattern"] and exact["dtype"] == "float32"
    half = export_run(sharing, tmp_path / "exp-bf16", dtype="bfloat16", uniform_rank=True)
    assert half["dtype"] == "bfloat16" and half["uniform_rank"] and 0 < half["peft_max_abs_logit_diff"] < 1e-2
    card = ModelCard.load(tmp_path / "exp-sharing" / "README.md")  # the run's card, with the export's checks
    assert card.data.library_name == "peft" and card.data.tags == ["mora-train", "mora", "lora", "peft"]
    assert "**Exact export.**" in card.text and "**Merge check: passed.**" in card.text and "| r̂=" in card.text
    from_lora = export_run(lora, tmp_path / "exp-lora")
    assert from_lora["peft_max_abs_logit_diff"] < 1e-4 and from_lora["rank"] == 8
    cut = export_run(sharing, tmp_path / "exp-cut", rank=2)  # truncated: evaluated before / after by default
    assert cut["max_relative_error"] > 0 and set(cut["evaluation"]) == {"metric", "adapter", "exported_lora", "folder"}
    # said as it is: truncated, with its error, never "exact"; the evaluation next to the folder, not inside it
    assert "truncated SVD (--rank 2)" in cut["how"] and "not exact" in cut["how"] and "exact LoRA" not in cut["how"]
    assert "exact LoRA factors" in exact["how"]
    assert cut["evaluation"]["folder"] == str(tmp_path / "exp-cut-evaluation")
    assert (tmp_path / "exp-cut-evaluation" / "export_evaluation.json").is_file()
    assert sorted(p.name for p in (tmp_path / "exp-cut").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "export_report.json",
        "export_report.md",
    ]

    # (peft warns about adapter names inside its own "lora_" prefix: call the LoRA run's export "plain")
    adapters = {"sharing": tmp_path / "exp-sharing", "plain": tmp_path / "exp-lora"}
    model, tokenizer = load_many("tiny-llama", adapters)
    requests = [
        {"adapter": "sharing", "prompt": "key 1 ->"},
        {"adapter": "plain", "prompt": "another key ->"},
        {"adapter": None, "prompt": "k"},
        {"adapter": "plain", "prompt": "key 1 ->"},
    ]
    mixed = generate(model, tokenizer, requests, max_new_tokens=6, batch_size=4)
    alone = [generate(model, tokenizer, [r], max_new_tokens=6, batch_size=1)[0] for r in requests]
    assert mixed == alone
    assert mixed[0] != mixed[3] or mixed[1] != alone[3]  # different adapters answer differently here


@pytest.mark.integration  # starts an interpreter (the plain-peft check or the export CLI)
def test_a_run_with_restarts_exports_its_total_update(tmp_path: Path) -> None:
    remora = _train(
        tmp_path,
        "remora",
        "adapter=mora",
        "adapter.mora_type=sharing",
        "adapter.restart.every_steps=4",
        "adapter.restart.mora_types=[sharing,grouping]",
    )
    report = export_run(remora, tmp_path / "exp")
    assert report["how"].startswith("SVD of merged - base") and report["peft_max_abs_logit_diff"] < 1e-4


@pytest.mark.integration  # starts an interpreter (the plain-peft check or the export CLI)
def test_check_with_peft_catches_a_wrong_export(tmp_path: Path) -> None:
    cfg, adapter = random_mora_adapter("sharing")
    factors = adapter.lora_factors()
    name = next(iter(factors))
    B, A = factors[name]
    factors[name] = (B * 2, A)  # a deliberately wrong layer
    export_lora(factors, tmp_path / "bad")
    base, _ = load_model_and_tokenizer(cfg.model)
    assert check_with_peft(base, tmp_path / "bad", adapter.model.eval()) > 1e-3


def test_a_truncated_export_of_an_adapter_folder_is_written_without_an_evaluation(tmp_path: Path) -> None:
    """An adapter folder has no task: a truncated export of it is not evaluated by default (it used to write the
    folder and then fail), and --evaluate on it is refused before anything is written."""
    run_dir = _train(tmp_path, "sharing", "adapter=mora", "adapter.mora_type=sharing")
    with pytest.raises(MoraTrainError, match="--evaluate needs a run dir"):
        export_run(run_dir / "adapter", tmp_path / "asked", rank=2, base_model="tiny-llama", check=False, evaluate=True)
    assert not (tmp_path / "asked").exists()
    report = export_run(run_dir / "adapter", tmp_path / "cut", rank=2, base_model="tiny-llama", check=False)
    assert report["truncated"] and report["rank"] == 2 and "evaluation" not in report
    assert not (tmp_path / "cut" / "evaluation").exists()
    # Its model card says it is truncated, and claims none of the trained model's scores for it.
    card = ModelCard.load(tmp_path / "cut" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags and card.data.eval_results is None
    assert "**Truncated export.**" in card.text and "PeftModel.from_pretrained" in card.text
    assert "| r̂=" in card.text  # RUN_DIR/adapter: the run's own facts (its layers), read from beside the folder
    assert not (tmp_path / "cut-evaluation").exists()

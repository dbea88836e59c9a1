"""A method defined outside mora_train/ (tests/support/custom_adapter.py) runs through the normal pipeline once it
is registered: it trains, merges (merged/ checked against the adapted model), re-attaches from RUN_DIR/adapter
and exports as a PEFT LoRA folder, with nothing in mora_train/ naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mora_train.adapters import ADAPTER_TYPES, load_adapter, register_adapter
from mora_train.adapters.base import ADAPTER_CONFIG_NAME
from mora_train.core.errors import MoraTrainError
from tests.conftest import TINY_RUN, compose_config, run_pipeline, typed_config
from tests.support.custom_adapter import RankOneAdapter, register

SEARCH_PATH = f"hydra.searchpath=[file://{Path(__file__).parents[1] / 'support' / 'configs'}]"
ARGS = [SEARCH_PATH, "adapter=rank_one", "trainer.max_steps=6"]


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    """The method is known while this module runs, and forgotten after: other tests list every registered method
    (the config reference, the typed-config tests) and must not meet it."""
    register()
    yield
    ADAPTER_TYPES.pop(RankOneAdapter.name, None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("custom") / "run"
    run_pipeline(compose_config([*TINY_RUN, *ARGS], out))
    return out


def test_registration_refuses_a_taken_name() -> None:
    assert ADAPTER_TYPES["rank_one"] is RankOneAdapter
    impostor = type("Impostor", (RankOneAdapter,), {"name": "lora"})
    with pytest.raises(MoraTrainError, match="taken"):
        register_adapter(impostor)


def test_custom_adapter_trains_and_merges(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["merge_max_abs_diff"] <= 1e-4
    assert json.loads((run_dir / "adapter" / ADAPTER_CONFIG_NAME).read_text())["adapter"] == "rank_one"
    assert (run_dir / "merged" / "model.safetensors").is_file()


def test_custom_adapter_reattaches_and_matches_merged(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mora_train.models import load_model_and_tokenizer

    cfg = typed_config([*TINY_RUN, *ARGS], run_dir)
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    adapter = load_adapter(base, run_dir / "adapter")
    assert isinstance(adapter, RankOneAdapter)
    assert any(bool(m.b.abs().sum() > 0) for m in adapter.layers.values()), "training left b at zero"
    batch = tokenizer(["a short probe", "another one"], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (adapter.model.eval()(**batch).logits - merged(**batch).logits).abs().max().item()
    assert diff <= 1e-4


def test_custom_adapter_exports_as_lora(run_dir: Path, tmp_path: Path) -> None:
    from mora_train.pipeline.lora_export import export_run

    report = export_run(run_dir, tmp_path / "lora")
    assert report["peft_max_abs_logit_diff"] <= 1e-4
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

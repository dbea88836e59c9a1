"""The adapter protocol: every method implements all of it, and nothing outside adapters/ asks which method it holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from mora_train.adapters import ADAPTER_TYPES, adapter_config_problems, adapter_identity, build_adapter, load_adapter
from mora_train.core.errors import MoraTrainError
from mora_train.models import load_model_and_tokenizer
from tests.conftest import REPO, compose_config

PACKAGE = REPO / "mora_train"


def _name_switches(path: Path) -> list[str]:
    """Comparisons of anything with a method's name (`x == "mora"`, `name in ("lora", "full")`, match cases)."""
    names = set(ADAPTER_TYPES)
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path

    def is_name(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and node.value in names:
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(is_name(e) for e in node.elts)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(is_name(n) for n in [node.left, *node.comparators]):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.match_case) and is_name(getattr(node.pattern, "value", None) or ast.Constant(None)):
            found.append(f"{where}:{node.pattern.lineno}: case {ast.unparse(node.pattern)}")
    return found


def test_no_module_outside_the_adapters_package_branches_on_a_method_name() -> None:
    switches = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if "adapters" not in path.relative_to(PACKAGE).parts
        for hit in _name_switches(path)
    ]
    assert switches == [], "ask the adapter (a protocol operation) instead of its name:\n" + "\n".join(switches)


def test_the_name_switch_detector_finds_switches(tmp_path: Path) -> None:
    # Written outside the package: another xdist worker may be scanning mora_train/ at this moment.
    probe = tmp_path / "probe_switch.py"
    probe.write_text('def f(adapter):\n    if adapter.name == "mora":\n        return 1\n    return adapter in ("lora", "x")\n')
    assert len(_name_switches(probe)) == 2


def _tiny(adapter: str, *overrides: str):
    cfg = compose_config(["model=tiny-llama", f"adapter={adapter}", "rank=4", *overrides])
    model, _ = load_model_and_tokenizer(cfg.model)
    return cfg, build_adapter(model, cfg.adapter, cfg.rank, load_base=lambda: load_model_and_tokenizer(cfg.model)[0])


@pytest.mark.parametrize("adapter", ["lora", "mora", "full"])
def test_every_method_implements_the_whole_protocol(adapter: str, tmp_path: Path) -> None:
    cfg, built = _tiny(adapter)
    assert built.name == adapter and built.title().startswith(adapter)
    assert built.identity_now() == adapter_identity(cfg.adapter, cfg.rank)
    assert built.describe()["adapter"] == adapter
    trainable = built.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable.values())
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero update, so that save/load and ΔW are not trivially zero
        for p in trainable.values():
            p.add_(torch.randn_like(p) * 0.01)
    deltas = built.delta_weights()
    assert deltas and all(d.dtype == torch.float32 and d.abs().max() > 0 for d in deltas.values())
    built.save(tmp_path)
    ids = torch.randint(3, 200, (2, 8))
    with torch.no_grad():
        expected = built.model(input_ids=ids).logits

    _, fresh = _tiny(adapter)
    fresh.load_weights(tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh.model(input_ids=ids).logits, expected, atol=1e-6)
    if built.saves_whole_model:  # every weight trained: the folder is a plain transformers model
        reloaded_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    else:  # an adapter folder that stands alone on a fresh base model
        reloaded = load_adapter(load_model_and_tokenizer(cfg.model)[0], tmp_path)
        assert reloaded.name == adapter
        reloaded_model = reloaded.model
    with torch.no_grad():
        assert torch.allclose(reloaded_model(input_ids=ids).logits, expected, atol=1e-6)
    merged = built.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def test_full_fine_tuning_delta_is_trained_minus_base_weights() -> None:
    cfg, built = _tiny("full", "adapter.target_modules=[q_proj]")
    name = next(iter(built.delta_weights()))
    before = built.base_model.get_submodule(name).weight.detach().clone()
    with torch.no_grad():
        built.base_model.get_submodule(name).weight.add_(0.5)
    assert torch.allclose(built.delta_weights()[name], torch.full_like(before, 0.5))
    assert not built.saves_whole_model and built.module_summaries()
    model, _ = load_model_and_tokenizer(cfg.model)
    with pytest.raises(MoraTrainError, match="load the base model"):
        build_adapter(model, cfg.adapter, cfg.rank).delta_weights()


@pytest.mark.parametrize("adapter", ["lora", "mora"])
def test_fold_and_reset_keeps_the_function_and_zeroes_the_update(adapter: str) -> None:
    _, built = _tiny(adapter)
    with torch.no_grad():
        for p in built.restart_parameters():
            p.normal_(0, 0.05)
    base_before = {n: w.detach().clone() for n, w in built.adapted_base_weights().items()}
    deltas = built.delta_weights()
    ids = torch.randint(3, 200, (2, 8))
    built.model.eval()
    with torch.no_grad():
        before = built.model(input_ids=ids).logits
    built.fold_and_reset(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(built.model(input_ids=ids).logits, before, atol=1e-5)
    for name, weight in built.adapted_base_weights().items():
        assert torch.allclose(weight, base_before[name] + deltas[name], atol=1e-6)
    assert all(d.abs().max() == 0 for d in built.delta_weights().values())


def test_methods_without_restarts_or_operators_refuse_them_by_name() -> None:
    _, full = _tiny("full")
    for operation in (full.fold_and_reset, full.restart_parameters, lambda: full.set_operator("sharing")):
        with pytest.raises(MoraTrainError, match="adapter=full"):
            operation()
    _, lora = _tiny("lora")
    assert lora.operator_types() == {}
    with pytest.raises(MoraTrainError, match="adapter=lora has no operator"):
        lora.set_operator("sharing")


def test_full_fine_tuning_has_no_dead_keys() -> None:
    cfg = compose_config(["adapter=full"])
    assert "dropout" not in cfg.adapter
    bad = {**OmegaConf.to_container(cfg.adapter), "dropout": 0.1}  # no adapter input to drop out: a dead key
    assert any("`adapter.dropout` is not a known key of adapter=full" in p for p in adapter_config_problems(bad, 8))


def test_full_fine_tuning_of_some_layers_saves_just_them_and_reloads_onto_the_base(tmp_path: Path) -> None:
    cfg, built = _tiny("full", "adapter.target_modules=[q_proj,v_proj]")
    with torch.no_grad():
        for p in built.trainable_parameters().values():
            p.add_(0.01)
    built.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    reloaded = load_adapter(load_model_and_tokenizer(cfg.model)[0], tmp_path)
    ids = torch.randint(3, 200, (2, 8))
    with torch.no_grad():
        assert torch.allclose(reloaded.model(input_ids=ids).logits, built.model(input_ids=ids).logits, atol=1e-6)

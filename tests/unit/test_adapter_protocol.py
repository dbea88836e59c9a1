"""The adapter protocol: every method implements all of it, and nothing outside adapters/ asks which method it holds."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mora_train.adapters import ADAPTER_TYPES, adapter_config_problems, adapter_identity, build_adapter, load_adapter
from mora_train.adapters.capabilities import lora_factors, operator_switching, operator_types, restartable
from mora_train.adapters.full import FullSettings
from mora_train.adapters.lora import LoraSettings
from mora_train.core.errors import MoraTrainError
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import RunConfig, read_run_config
from mora_train.training.config import RestartConfig, TrainerConfig
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
    probe.write_text(
        'def f(adapter):\n    if adapter.name == "mora":\n        return 1\n    return adapter in ("lora", "x")\n'
    )
    assert len(_name_switches(probe)) == 2


def typed_config(*overrides: str) -> RunConfig:
    """The typed sections of a composed config (each section checked on its own: no problem expected)."""
    run, problems = read_run_config(compose_config(list(overrides)))
    assert problems == []
    return run


def _tiny(adapter: str, *overrides: str):
    cfg = typed_config("model=tiny-llama", f"adapter={adapter}", "rank=4", *overrides)
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
    for ask in (restartable, operator_switching, lora_factors):
        with pytest.raises(MoraTrainError, match="adapter=full"):
            ask(full)
    _, lora = _tiny("lora")
    assert operator_types(lora) == {}
    with pytest.raises(MoraTrainError, match="adapter=lora has no operator"):
        operator_switching(lora)


def test_full_fine_tuning_has_no_dead_keys() -> None:
    cfg = compose_config(["adapter=full"])
    assert "dropout" not in cfg.adapter
    # No adapter input to drop out: a dead key, refused for adapter=full only.
    _, problems = read_run_config(compose_config(["adapter=full", "+adapter.dropout=0.1"]))
    assert any(p.startswith("`adapter.dropout` is not a known key") for p in problems)
    _, problems = read_run_config(compose_config(["adapter=lora", "adapter.dropout=0.1"]))
    assert problems == []


def test_the_config_check_keeps_what_parsing_cannot_find() -> None:
    lora = LoraSettings(name="lora", alpha=16, target_modules=["q_proj"], dropout=0.0)
    full = FullSettings(name="full", target_modules="all")
    plain = TrainerConfig()
    assert adapter_config_problems(lora, 8, plain) == []
    assert adapter_config_problems(full, None, plain) == []  # full fine-tuning has no rank
    assert adapter_config_problems(lora, 0, plain) == [
        "`rank=0` must be a positive integer (the LoRA rank; MoRA matches its parameter count)"
    ]
    assert "4-/8-bit weights cannot take gradient steps" in "\n".join(adapter_config_problems(full, 8, plain, "nf4"))
    assert adapter_config_problems(lora, 8, plain, "nf4") == []
    cycle = TrainerConfig(restart=RestartConfig(every_steps=4, mora_types=[1, 2]))
    assert adapter_config_problems(lora, 8, cycle) == [
        "`trainer.restart.mora_types` only applies to adapter=mora; remove it"
    ]
    refused = "\n".join(
        adapter_config_problems(full, 8, TrainerConfig(restart=RestartConfig(every_steps=4), train_embeddings=True))
    )
    assert "`trainer.restart.every_steps=4` with adapter=full" in refused
    assert "`trainer.train_embeddings=true` with adapter=full" in refused


def test_settings_checks_name_the_key_and_the_fix() -> None:
    _, problems = read_run_config(
        compose_config(
            [
                "adapter=lora",
                "adapter.alpha=-1",
                "adapter.dropout=1.5",
                "adapter.target_modules=all",
            ]
        )
    )
    assert "`adapter.alpha=-1` must be positive" in problems
    assert "`adapter.dropout=1.5` must be in [0, 1)" in problems
    assert any(p.startswith("`adapter.target_modules=all` must be a list of module names") for p in problems)
    _, problems = read_run_config(compose_config(["adapter=full", "adapter.target_modules=[]"]))
    assert problems == ["`adapter.target_modules=[]` must be a non-empty list of module names"]


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


@pytest.mark.parametrize("adapter", ["lora", "mora", "full"])
def test_exactly_one_registered_class_reads_each_saved_folder(adapter: str, tmp_path: Path) -> None:
    """load_adapter asks the registry: the method that saved a folder reads it, and no other does."""
    _, built = _tiny(adapter, "adapter.target_modules=[q_proj]")
    built.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert [name for name, cls in ADAPTER_TYPES.items() if cls.reads(config)] == [adapter]


def test_a_folder_no_method_reads_is_refused_naming_the_methods(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    model, _ = load_model_and_tokenizer(typed_config("model=tiny-llama").model)
    with pytest.raises(MoraTrainError, match="none of lora, mora, full reads it"):
        load_adapter(model, tmp_path)

"""Rebuilding the exported model from gathered weights (what rank 0 does after ZeRO / FSDP training), in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mora_train.adapters import build_adapter, load_adapter
from mora_train.core.errors import MoraTrainError
from mora_train.export import logits_of, probe_batch, unsharded_adapter
from mora_train.models import load_model_and_tokenizer
from mora_train.training.gather import FinalWeights, weights_checksum
from tests.conftest import TINY_RUN, compose_run

ADAPTERS = {"lora": ["adapter=lora", "rank=4"], "mora": ["adapter=mora", "rank=4"], "full": ["adapter=full"]}


def build(variant: str):
    run = compose_run([*TINY_RUN, *ADAPTERS[variant]])
    model, tokenizer = load_model_and_tokenizer(run.model)
    return build_adapter(model, run.adapter, run.rank), tokenizer


def trained(variant: str):
    """An adapter whose trainable weights moved away from their init (as after training)."""
    adapter, tokenizer = build(variant)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapter.trainable_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return adapter, tokenizer


@pytest.mark.parametrize("variant", sorted(ADAPTERS))
def test_rebuilt_adapter_from_gathered_weights_computes_and_saves_what_the_trained_one_would(
    variant: str, tmp_path: Path
) -> None:
    adapter, _ = trained(variant)
    # As gathered: fp32 CPU copies, keyed by trainable-parameter name.
    state = {n: p.detach().float().cpu().clone() for n, p in adapter.trainable_parameters().items()}
    final = FinalWeights("deepspeed-zero3", 2, state, None, "cpu")
    rebuilt = unsharded_adapter(adapter, final, lambda: build(variant)[0])
    assert rebuilt is not adapter

    probe = probe_batch(
        [{"input_ids": [1, 5, 9, 20, 30], "labels": [0] * 5}, {"input_ids": [1, 7, 8], "labels": [0] * 3}], 0
    )
    expected = logits_of(adapter.model, probe)
    assert (logits_of(rebuilt.model, probe) - expected).abs().max().item() == 0.0
    if variant != "full":
        rebuilt.save(tmp_path)
        base, _ = load_model_and_tokenizer(compose_run([*TINY_RUN, *ADAPTERS[variant]]).model)
        reloaded = load_adapter(base, tmp_path)
        assert (logits_of(reloaded.model, probe) - expected).abs().max().item() == 0.0


def test_live_adapter_is_exported_as_is_when_nothing_was_gathered() -> None:
    adapter, _ = trained("lora")
    assert unsharded_adapter(adapter, None, lambda: pytest.fail("must not rebuild")) is adapter
    final = FinalWeights("ddp", 2, None, ["x", "x"], "cpu")
    assert unsharded_adapter(adapter, final, lambda: pytest.fail("must not rebuild")) is adapter


def test_a_zero3_shard_or_a_missing_weight_never_reaches_the_export() -> None:
    adapter, _ = trained("mora")
    state = {n: p.detach().clone() for n, p in adapter.trainable_parameters().items()}
    first = next(iter(state))
    shard = dict(state, **{first: torch.empty(0)})  # what a rank holds of a partitioned ZeRO-3 parameter
    with pytest.raises(MoraTrainError, match=r"gathered shape \(0,\)"):
        unsharded_adapter(adapter, FinalWeights("deepspeed-zero3", 2, shard, None, "cpu"), lambda: build("mora")[0])
    missing = {k: v for k, v in state.items() if k != first}
    with pytest.raises(MoraTrainError, match="trained but not gathered"):
        unsharded_adapter(adapter, FinalWeights("fsdp2", 2, missing, None, "cpu"), lambda: build("mora")[0])


def test_replica_checksum_sees_a_one_ulp_difference() -> None:
    adapter, _ = trained("lora")
    names = list(adapter.trainable_parameters())
    before = weights_checksum(adapter.model, names)
    assert weights_checksum(adapter.model, names) == before
    param = adapter.trainable_parameters()[names[-1]]
    with torch.no_grad():
        param.view(-1)[0] = torch.nextafter(param.view(-1)[0], torch.tensor(float("inf")))
    assert weights_checksum(adapter.model, names) != before

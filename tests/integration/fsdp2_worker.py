"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo): MoRA/LoRA/full under FSDP2.

Accelerate applies FSDP to GPU processes only, so this shards the tiny model with PyTorch's own
`fully_shard` on a CPU mesh, then checks what mora-train relies on:
  * forward + backward through the sharded model give the gradients of the unsharded one
    (both ranks see the same batch, so FSDP's averaged gradient equals the single-process one);
  * `gather_trainable_state` returns full fp32 weights on rank 0 only, never a shard;
  * the adapter rank 0 rebuilds from them computes exactly what the trained model computes.
Rank 0 prints one line: RESULT {json}.
"""

from __future__ import annotations

import json
import types

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mora_train.adapters import build_adapter
from mora_train.export import logits_of, unsharded_adapter
from mora_train.models import load_model_and_tokenizer
from mora_train.training.gather import FinalWeights, gather_trainable_state
from tests.conftest import TINY_RUN, typed_config

VARIANTS = {"lora": ["adapter=lora", "rank=4"], "mora": ["adapter=mora", "rank=4"], "full": ["adapter=full"]}


def build(overrides: list[str]):
    torch.manual_seed(0)  # as the pipeline's set_seed(cfg.seed): LoRA's random A is the same on every rank
    cfg = typed_config([*TINY_RUN, *overrides])
    model, _ = load_model_and_tokenizer(cfg.model)
    return build_adapter(model, cfg.adapter, cfg.rank)


def check(overrides: list[str], mesh) -> dict:
    adapter = build(overrides)
    generator = torch.Generator().manual_seed(0)  # same on both ranks: identical replicas before sharding
    with torch.no_grad():
        for param in adapter.trainable_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    names = list(adapter.trainable_parameters())
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2], [1, 50, 51, 52, 2, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids.masked_fill(ids == 0, -100)}
    probe = {"input_ids": ids, "attention_mask": (ids != 0).long()}

    model = adapter.model
    model.train()
    model(**batch).loss.backward()
    expected_grads = {n: p.grad.detach().clone() for n, p in adapter.trainable_parameters().items()}
    model.zero_grad(set_to_none=True)
    expected_weights = {n: p.detach().clone() for n, p in adapter.trainable_parameters().items()}
    expected_logits = logits_of(model, probe)

    for layer in adapter.base_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    first = dict(model.named_parameters())[names[0]]
    assert isinstance(first, DTensor)

    model.train()
    model(**batch).loss.backward()
    params = dict(model.named_parameters())
    grad_diff = max((params[n].grad.full_tensor() - expected_grads[n]).abs().max().item() for n in names)

    fake_trainer = types.SimpleNamespace(
        is_deepspeed_enabled=False,
        is_fsdp_enabled=True,
        model=model,
        accelerator=types.SimpleNamespace(
            state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=2))
        ),
    )
    state = gather_trainable_state(fake_trainer, names)
    result = {"local_shape": list(first.to_local().shape), "full_shape": list(first.shape), "grad_diff": grad_diff}
    if dist.get_rank() != 0:
        assert state is None
        return result
    result["weight_diff"] = max((state[n] - expected_weights[n]).abs().max().item() for n in names)
    rebuilt = unsharded_adapter(adapter, FinalWeights("fsdp2", 2, state, None, "cpu"), lambda: build(overrides))
    result["logit_diff"] = (logits_of(rebuilt.model, probe) - expected_logits).abs().max().item()
    return result


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {name: check(overrides, mesh) for name, overrides in VARIANTS.items()}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The adapter rank 0 exports after training: the live one, or, after ZeRO / FSDP, one rebuilt unsharded from
the full-precision weights every rank gathered (training.gather.collect_final_weights). The exported adapter and
merged checkpoint of a sharded run are thus written by exactly the code a single process runs, from the same
(fp32) weights."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from mora_train.adapters.base import Adapter
from mora_train.core.errors import MoraTrainError
from mora_train.training.gather import FinalWeights, unwrapped_named_parameters

log = logging.getLogger(__name__)


def unsharded_adapter(adapter: Adapter, final: FinalWeights | None, rebuild: Callable[[], Adapter]) -> Adapter:
    """The adapter to export on rank 0: the live one, or a rebuilt one holding the gathered weights.

    `rebuild` must build the same base model and adapter as the run did (same config); every trainable
    weight is then replaced by its gathered full-precision value, and any missing or mis-shaped weight
    is an error (so a [0]-shaped ZeRO-3 shard can never reach the exported adapter).
    """
    # Rank 0 builds and loads models alone from here on: never under ZeRO-3's zero.Init (a collective), which
    # transformers would use while a ZeRO-3 TrainingArguments is alive (even when training was skipped).
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if final is None or final.trainable_state is None:
        return adapter
    fresh = rebuild()
    live = unwrapped_named_parameters(fresh.model)
    state = final.trainable_state
    problems = [f"{n}: not in the rebuilt model" for n in state if n not in live]
    problems += [f"{n}: trained but not gathered" for n in fresh.trainable_parameters() if n not in state]
    problems += [
        f"{n}: gathered shape {tuple(t.shape)}, model's {tuple(live[n].shape)}"
        for n, t in state.items()
        if n in live and t.shape != live[n].shape
    ]
    if problems:
        raise MoraTrainError("cannot rebuild the trained model from the gathered weights: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for name, tensor in state.items():
            live[name].copy_(tensor.to(dtype=live[name].dtype))
    fresh.model.to(final.device)
    log.info("rebuilt the %s-trained model on rank 0 from gathered full-precision weights", final.engine)
    return fresh

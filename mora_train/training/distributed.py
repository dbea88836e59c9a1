"""Multi-process runs: which process this is, the process groups, one launch time, and rank 0's solo phases.

transformers.Trainer does the data-parallel work (Accelerate underneath: DDP, FSDP or DeepSpeed, chosen by
`distributed=`). This module holds what a multi-process *CLI run* needs around it:

* `prepare_cli` (before Hydra starts): join the process group and agree on one launch time, so that every
  rank resolves the same dated run dir (`${launch_time:...}` in configs/config.yaml, a resolver the CLI
  registers over `launch_time`; Hydra's `${now:...}` is evaluated per process and can differ by a second
  between ranks); ranks other than 0 get Hydra
  overrides that stop them writing `.hydra/` and the job log.
* `run_on_main_process`: rank 0 does the file work (run dir, export, evaluation, metrics); the other ranks
  wait on a long-timeout gloo group and share its result, or fail with it.

The `distributed` section itself (`DistributedConfig`), its TrainingArguments keys and the engine checks
that run before any model loads live in `mora_train.training.distributed_config`; gathering sharded weights
after training lives in `mora_train.training.gather`.

Launchers that set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are supported: `accelerate
launch` (multi-GPU or multi-node), `torchrun`, and the `deepspeed` launcher.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from mora_train.core.errors import MoraTrainError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Collectives (the default group) time out after this; rank 0's solo phases (export, evaluation) may take
# far longer, so the other ranks wait for it on their own gloo group with CONTROL_TIMEOUT. If rank 0 dies,
# the launcher (torchrun / accelerate launch) stops the other ranks, so a long wait cannot hang forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
CONTROL_TIMEOUT = timedelta(hours=24)

_control_group: Any = None
_launch_time: datetime | None = None


# -- who am I --------------------------------------------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


class MainProcessFailed(MoraTrainError):
    """Raised on ranks != 0 when rank 0 failed in a phase it runs alone; rank 0 has already reported why."""


# -- process group ------------------------------------------------------------------------------------


def init_process_group() -> None:
    """Join the default process group (idempotent; a no-op in a single process) and create the control group.

    Accelerate, DeepSpeed and FSDP find the group already initialised and use it. On GPUs it carries
    both NCCL (CUDA tensors) and gloo (CPU tensors); on CPU, gloo.
    """
    import torch

    global _control_group
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    if _control_group is None:
        # A collective: every rank creates it at the same point (here, before anything else creates groups).
        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def shutdown() -> None:
    """Leave the process groups (a no-op when none was joined); an exiting rank must not leave gloo threads behind."""
    global _control_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def _broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank, over the long-timeout gloo group."""
    import torch.distributed as dist

    init_process_group()
    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    import torch.distributed as dist

    init_process_group()
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value, group=_control_group)
    return gathered


def launch_time() -> datetime:
    """The run's launch time, the same on every rank (rank 0's clock); fixed at the first call."""
    global _launch_time
    if _launch_time is None:
        stamp = time.time()
        if world_size() > 1:
            stamp = float(_broadcast_object(stamp))
        _launch_time = datetime.fromtimestamp(stamp)
    return _launch_time


def prepare_cli(argv: list[str]) -> list[str]:
    """Before Hydra parses `argv`: join the process group, fix the launch time, silence Hydra on ranks != 0.

    Returns the argv Hydra should see. The `deepspeed` launcher's `--local_rank=N` argument is dropped
    (LOCAL_RANK is in the environment too).
    """
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if world_size() <= 1:
        return argv
    init_process_group()
    launch_time()
    if not is_main_process():
        # Rank 0 alone writes the run dir; the others log warnings and errors to the console only.
        quiet = {
            "hydra.output_subdir": "hydra.output_subdir=null",
            "hydra/job_logging": "hydra/job_logging=stdout",
            "hydra.job_logging.root.level": "hydra.job_logging.root.level=WARNING",
        }
        argv = argv + [override for key, override in quiet.items() if not any(a.startswith(key + "=") for a in argv)]
    return argv


def run_on_main_process(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and return its result on every rank.

    If it fails on rank 0, the others raise MainProcessFailed (the CLI exits quietly with status 2 on
    them; rank 0 reports the error). In a single process this is just `work()`.
    """
    if world_size() <= 1:
        return work()
    if is_main_process():
        try:
            value = work()
        except MoraTrainError as err:
            _broadcast_object(("failed", str(err)))
            raise
        except BaseException as err:
            _broadcast_object(("failed", f"{type(err).__name__}: {err}"))
            raise
        _broadcast_object(("ok", value))
        return value
    status, payload = _broadcast_object(None)
    if status != "ok":
        raise MainProcessFailed(f"rank 0 failed: {payload}")
    return payload

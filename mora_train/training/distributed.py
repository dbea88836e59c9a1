"""Multi-process runs: one run dir, one writer, engine settings, and what only data parallelism allows.

transformers.Trainer does the data-parallel work (Accelerate underneath: DDP, FSDP or DeepSpeed, chosen by
`distributed=`). This module holds what a multi-process *CLI run* needs around it:

* `prepare_cli` (before Hydra starts): join the process group and agree on one launch time, so that every
  rank resolves the same dated run dir (`${launch_time:...}` in configs/config.yaml; Hydra's `${now:...}`
  is evaluated per process and can differ by a second between ranks); ranks other than 0 get Hydra
  overrides that stop them writing `.hydra/` and the job log.
* `run_on_main_process`: rank 0 does the file work (run dir, export, evaluation, metrics); the other ranks
  wait on a long-timeout gloo group and share its result, or fail with it.
* `training_arguments_kwargs`: `cfg.distributed` -> TrainingArguments keys (`deepspeed=`, `fsdp=`, `ddp_*`).
* `config_problems`: engine settings and launch environment checked before any model loads; tensor,
  pipeline, context and sequence parallelism are refused.

Gathering sharded weights after training lives in `mora_train.training.gather`.

Launchers that set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are supported: `accelerate
launch` (multi-GPU or multi-node), `torchrun`, and the `deepspeed` launcher.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from omegaconf import DictConfig, OmegaConf

from mora_train.configs import CONFIG_DIR
from mora_train.core.errors import MoraTrainError

if TYPE_CHECKING:
    from mora_train.adapters import Adapter

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("none", "ddp", "fsdp", "deepspeed")
DISTRIBUTED_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "backend": (str,),
    "deepspeed_config": (str, type(None)),
    "deepspeed_overrides": (dict, type(None)),
    "fsdp_config": (dict, type(None)),
    "ddp_find_unused_parameters": (bool,),
}
# Relative deepspeed_config paths are looked up here when they do not exist relative to the working dir.
DISTRIBUTED_CONFIG_DIR = CONFIG_DIR / "distributed"
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


def register_launch_time_resolver() -> None:
    """`${launch_time:%Y-%m-%d}`: Hydra's `${now:...}`, but one instant shared by all ranks (and all patterns).

    Cached in the config, as Hydra caches `${now:...}`: a launcher that runs the jobs of a sweep in other
    processes (submitit, Ray) hands them the sweep's config, and Hydra copies its resolver cache into each
    job's config, so every job resolves the sweep dir the parent created instead of its own start time.
    """
    OmegaConf.register_new_resolver(
        "launch_time", lambda pattern: launch_time().strftime(pattern), replace=True, use_cache=True
    )


# Available as soon as this module is imported (the CLI imports it before Hydra composes configs/config.yaml).
register_launch_time_resolver()


def prepare_cli(argv: list[str]) -> list[str]:
    """Before Hydra parses `argv`: join the process group, fix the launch time, silence Hydra on ranks != 0.

    Returns the argv Hydra should see. The `deepspeed` launcher's `--local_rank=N` argument is dropped
    (LOCAL_RANK is in the environment too).
    """
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    register_launch_time_resolver()
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


# -- config -> TrainingArguments -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def deepspeed_config_path(value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return DISTRIBUTED_CONFIG_DIR / path


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def deepspeed_config(dist_cfg: DictConfig) -> dict:
    """The DeepSpeed JSON named by `distributed.deepspeed_config`, with `distributed.deepspeed_overrides` merged in."""
    config = json.loads(deepspeed_config_path(dist_cfg.deepspeed_config).read_text())
    return _merge(config, _plain(dist_cfg.get("deepspeed_overrides")) or {})


def training_arguments_kwargs(dist_cfg: DictConfig | None, trainer_cfg: DictConfig) -> dict[str, Any]:
    """TrainingArguments keys for the chosen engine (validated beforehand by `config_problems`)."""
    if dist_cfg is None:
        return {}
    kwargs: dict[str, Any] = {"ddp_find_unused_parameters": bool(dist_cfg.get("ddp_find_unused_parameters", False))}
    if dist_cfg.backend == "deepspeed":
        kwargs["deepspeed"] = deepspeed_config(dist_cfg)
    elif dist_cfg.backend == "fsdp":
        fsdp_config = dict(_plain(dist_cfg.fsdp_config) or {})
        if trainer_cfg.gradient_checkpointing:
            # FSDP checkpoints whole wrapped layers itself; Trainer refuses both kinds at once, and the
            # model-level kind costs FSDP an extra all-gather per layer in backward.
            fsdp_config["activation_checkpointing"] = True
            kwargs["activation_checkpointing"] = False
            kwargs["activation_checkpointing_kwargs"] = None
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp_config
    return kwargs


# -- validation ----------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _launched() -> bool:
    """True under a distributed launcher (even with one process), which DeepSpeed and FSDP need."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _parallelism_problems(dist_cfg: dict, method: type[Adapter] | None, ds_config: dict | None) -> list[str]:
    """Anything but data parallelism is refused: MoRA needs every layer's whole rows and columns."""
    adapter = method.name if method else None
    why = method.parallelism_refusal if method else "mora-train's export gathers data-parallel shards only"
    found = []
    tp_env = int(os.environ.get("PARALLELISM_CONFIG_TP_SIZE", "1") or 1)
    if tp_env > 1:
        found.append(f"the accelerate launch config asks for tensor parallelism (tp_size={tp_env})")
    for name in ("CP", "SP"):
        size = int(os.environ.get(f"PARALLELISM_CONFIG_{name}_SIZE", "1") or 1)
        if size > 1:
            found.append(f"the accelerate launch config asks for {name.lower()}_size={size}")
    if _env_flag("ACCELERATE_USE_MEGATRON_LM"):
        found.append("the accelerate launch config selects Megatron-LM (tensor/pipeline parallelism)")
    if ds_config is not None:
        autotp = (ds_config.get("tensor_parallel") or {}).get("autotp_size", 0)
        if isinstance(autotp, int) and autotp > 1:
            found.append(f"the DeepSpeed config asks for tensor parallelism (tensor_parallel.autotp_size={autotp})")
        if "pipeline" in ds_config:
            found.append("the DeepSpeed config has a `pipeline` section (pipeline parallelism)")
    return [
        f"{what}: not supported for adapter={adapter} — {why}. Use data parallelism only: "
        "distributed=none/ddp (replicas), fsdp or zero2/zero3 (sharded)"
        for what in found
    ]


def _deepspeed_problems(dist_cfg: dict, trainer: dict, problems: list[str]) -> dict | None:
    path_value = dist_cfg.get("deepspeed_config")
    if not isinstance(path_value, str):
        problems.append("`distributed.deepspeed_config` must name a DeepSpeed JSON file for distributed.backend=deepspeed")
        return None
    path = deepspeed_config_path(path_value)
    if not path.is_file():
        problems.append(f"`distributed.deepspeed_config={path_value}` does not exist (looked for {path})")
        return None
    try:
        config = _merge(json.loads(path.read_text()), dist_cfg.get("deepspeed_overrides") or {})
    except json.JSONDecodeError as err:
        problems.append(f"`distributed.deepspeed_config={path_value}` is not valid JSON: {err}")
        return None
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"distributed={dist_cfg.get('name')} needs DeepSpeed, which is not installed: "
            "pip install 'mora-train[deepspeed]' (or pip install deepspeed)"
        )
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"`zero_optimization.stage={stage}` in {path} must be 0, 1, 2 or 3")
    # Numbers the Trainer also sets must agree with ours; "auto" lets the Trainer fill them in.
    micro, batch = trainer.get("micro_batch_size"), trainer.get("batch_size")
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": batch,
    }
    for key, ours in expected.items():
        value = config.get(key, "auto")
        if value != "auto" and ours is not None and value != ours:
            problems.append(f"`{key}: {value}` in {path} disagrees with trainer settings ({ours}); set it to \"auto\"")
    precision = trainer.get("precision")
    for key, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        enabled = (config.get(key) or {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != wanted:
            problems.append(
                f"`{key}.enabled: {enabled}` in {path} disagrees with trainer.precision={precision}; set it to \"auto\""
            )
    if not _launched():
        problems.append(
            f"distributed={dist_cfg.get('name')} (DeepSpeed) runs under a launcher, even on one GPU: "
            f"`accelerate launch --num_processes 1 -m mora_train distributed={dist_cfg.get('name')} ...` "
            f"or `scripts/launch.sh --gpus 1 distributed={dist_cfg.get('name')} ...`"
        )
    return config


def _fsdp_problems(dist_cfg: dict, method: type[Adapter] | None, problems: list[str]) -> None:
    import torch

    fsdp = dist_cfg.get("fsdp_config")
    if not isinstance(fsdp, dict):
        problems.append("`distributed.fsdp_config` must be a mapping for distributed.backend=fsdp")
        return
    version = fsdp.get("version", 2)
    if version not in (1, 2):
        problems.append(f"`distributed.fsdp_config.version={version}` must be 1 or 2 (2, per-parameter sharding, is recommended)")
    frozen_base = method.freezes_base if method else True
    if version == 1 and frozen_base and str(fsdp.get("use_orig_params", True)).lower() != "true":
        problems.append(
            "`distributed.fsdp_config.use_orig_params=false` cannot train adapters with FSDP1 (frozen and "
            "trainable weights share flattened shards); set it to true or use version: 2"
        )
    if str(fsdp.get("cpu_ram_efficient_loading", False)).lower() == "true":
        problems.append(
            "`distributed.fsdp_config.cpu_ram_efficient_loading=true` is not supported: adapters are attached "
            "after loading, which needs real (not meta) base weights on every rank; set it to false"
        )
    if not torch.cuda.is_available():
        problems.append(
            f"distributed={dist_cfg.get('name')} (FSDP) needs CUDA GPUs (Accelerate applies FSDP only to GPU "
            "processes); on CPU use distributed=none (DDP) or distributed=zero2/zero3"
        )
    elif not _launched():
        problems.append(
            f"distributed={dist_cfg.get('name')} (FSDP) runs under a launcher, even on one GPU: "
            f"`accelerate launch --num_processes 1 -m mora_train distributed={dist_cfg.get('name')} ...`"
        )


def config_problems(cfg: DictConfig) -> list[str]:
    """Problems with `cfg.distributed` and the launch environment, each naming the key and the fix."""
    dist_section = cfg.get("distributed")
    if dist_section is None:
        return []
    problems: list[str] = []
    if not isinstance(dist_section, DictConfig):
        return [f"`distributed` must be a mapping (pick one with distributed=none|ddp|fsdp|zero2|zero3|...), got {dist_section!r}"]
    dist_cfg = OmegaConf.to_container(dist_section, resolve=True)
    for key, value in dist_cfg.items():
        if key not in DISTRIBUTED_SCHEMA:
            problems.append(f"`distributed.{key}` is not a known key; known keys: {', '.join(sorted(DISTRIBUTED_SCHEMA))}")
        elif (isinstance(value, bool) and bool not in DISTRIBUTED_SCHEMA[key]) or not isinstance(value, DISTRIBUTED_SCHEMA[key]):
            problems.append(f"`distributed.{key}` has the wrong type: {value!r}")
    backend = dist_cfg.get("backend")
    adapter_section = cfg.get("adapter")
    # Imported here: the CLI imports this module before Hydra runs, and peft/transformers load slowly.
    from mora_train.adapters import ADAPTER_TYPES

    method = ADAPTER_TYPES.get(adapter_section.get("name")) if isinstance(adapter_section, DictConfig) else None
    trainer_section = cfg.get("trainer")
    trainer = OmegaConf.to_container(trainer_section, resolve=True) if isinstance(trainer_section, DictConfig) else {}
    if backend not in BACKENDS:
        problems.append(f"`distributed.backend={backend}` is unknown; use one of {', '.join(BACKENDS)}")
        return problems
    ds_config = None
    if backend == "deepspeed":
        ds_config = _deepspeed_problems(dist_cfg, trainer, problems)
    elif backend == "fsdp":
        _fsdp_problems(dist_cfg, method, problems)
    # An accelerate launch config can pick an engine too (ACCELERATE_USE_*); two different engines conflict.
    launcher_engine = "deepspeed" if _env_flag("ACCELERATE_USE_DEEPSPEED") else "fsdp" if _env_flag("ACCELERATE_USE_FSDP") else None
    if launcher_engine and backend in ("deepspeed", "fsdp"):
        problems.append(
            f"the accelerate launch config selects {launcher_engine} and distributed={dist_cfg.get('name')} selects "
            f"{backend}: choose the engine in one place — launch with a plain multi-GPU accelerate config "
            "(mora_train/configs/distributed/accelerate/multi_gpu.json) and pick it with distributed=..."
        )
    problems.extend(_parallelism_problems(dist_cfg, method, ds_config))
    engine = backend if backend in ("deepspeed", "fsdp") else launcher_engine
    problems.extend(_adapter_option_problems(adapter_section, engine, ds_config))
    problems.extend(_quantized_base_problems(cfg.get("model"), engine, dist_cfg.get("name")))
    return problems


def _quantized_base_problems(model_section: Any, engine: str | None, engine_name: Any) -> list[str]:
    """A 4-/8-bit base trains on one GPU or under DDP (each rank holds the whole quantized model); DeepSpeed
    and FSDP shard or cast flat parameter groups, which bitsandbytes' packed codes and their quantization
    state do not survive in our setup (untested: refused rather than silently wrong)."""
    from mora_train.models.quantization import quantization_of

    quantization = quantization_of(model_section) if isinstance(model_section, DictConfig) else "none"
    if engine is None or quantization == "none":
        return []
    return [
        f"`model.quantization={quantization}` with `distributed={engine_name}` ({engine}): a quantized base trains "
        "on one GPU or with distributed=ddp (each GPU holds the whole 4-/8-bit model, which is what makes it "
        f"small); {engine} would shard or cast bitsandbytes' packed weights. Use distributed=ddp or none, or "
        "model.quantization=none with this engine"
    ]


def _adapter_option_problems(adapter_section: Any, engine: str | None, ds_config: dict | None) -> list[str]:
    """ReMoRA/ReLoRA restarts and trained embeddings need whole weights that ZeRO / FSDP split or copy."""
    if engine is None or not isinstance(adapter_section, DictConfig):
        return []
    problems = []
    restart = adapter_section.get("restart")
    every = restart.get("every_steps", 0) if isinstance(restart, DictConfig) else 0
    if isinstance(every, int) and every > 0:
        problems.append(
            f"`adapter.restart.every_steps={every}` (ReMoRA/ReLoRA) merges ΔW into the base weights and resets "
            f"optimizer state in place during training, which {engine} keeps sharded or copied; train restarts with "
            "distributed=none or ddp (DDP: every rank merges identically)"
        )
    sharded = engine == "fsdp" or ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0) == 3
    if adapter_section.get("train_embeddings", False) is True and sharded:
        problems.append(
            f"`adapter.train_embeddings=true` saves the live embedding weights with every checkpoint, which "
            f"{engine} shards; use distributed=zero2 or none/ddp"
        )
    return problems

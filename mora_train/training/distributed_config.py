"""The `distributed` section (configs/distributed/*.yaml): which engine Accelerate runs under transformers.Trainer.

* `DistributedConfig`: the section; its `check` holds what the section alone shows (a DeepSpeed JSON that is
  missing or broken, FSDP settings adapters cannot use).
* `training_arguments_kwargs`: the section -> TrainingArguments keys (`deepspeed=`, `fsdp=`, `ddp_*`).
* `config_problems`: what needs the trainer and adapter sections or the launch environment (DeepSpeed
  installed, numbers that agree with `trainer.*`, a launcher, one engine chosen once); tensor, pipeline,
  context and sequence parallelism are refused.

Kept apart from `distributed.py` (process groups), which the CLI imports before Hydra runs; the adapter
registry is imported inside `config_problems` for the same reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mora_train.config.schema import Section, setting
from mora_train.configs import CONFIG_DIR

if TYPE_CHECKING:
    from mora_train.adapters import Adapter
    from mora_train.adapters.config import AdapterSettings
    from mora_train.training.config import TrainerConfig

BACKENDS = ("none", "ddp", "fsdp", "deepspeed")
# Relative deepspeed_config paths are looked up here when they do not exist relative to the working dir.
DISTRIBUTED_CONFIG_DIR = CONFIG_DIR / "distributed"


class DistributedConfig(Section):
    """The multi-process engine (distributed=none|ddp|fsdp|zero2|zero3|zero3_offload|multinode)."""

    name: str = setting(default="none", help="the option's name (distributed=NAME picks configs/distributed/NAME.yaml)")
    backend: Literal["none", "ddp", "fsdp", "deepspeed"] = setting(
        default="none", help="which engine Accelerate runs under transformers.Trainer; none: plain DDP under a launcher"
    )
    deepspeed_config: str | None = setting(
        default=None,
        help="backend=deepspeed: the DeepSpeed JSON, relative to configs/distributed/ or the working directory",
    )
    deepspeed_overrides: dict[str, Any] | None = setting(
        factory=dict,
        help="deep-merged into the DeepSpeed JSON, e.g. "
        "+distributed.deepspeed_overrides.zero_optimization.overlap_comm=false",
    )
    fsdp_config: dict[str, Any] | None = setting(
        default=None, help="backend=fsdp: FSDP settings, passed as TrainingArguments(fsdp=True, fsdp_config=...)"
    )
    ddp_find_unused_parameters: bool = setting(
        default=False, help="DDP: search for weights a forward did not use (every trainable weight is used: false)"
    )

    @property
    def engine(self) -> str | None:
        """The sharding engine this section picks (deepspeed, fsdp), or None for replicas (none, ddp)."""
        return self.backend if self.backend in ("deepspeed", "fsdp") else None

    def check(self, prefix: str) -> list[str]:
        problems: list[str] = []
        if self.backend == "deepspeed":
            _, problem = self._read_deepspeed(prefix)
            if problem:
                problems.append(problem)
        elif self.backend == "fsdp":
            problems += self._fsdp_problems(prefix)
        return problems

    def _read_deepspeed(self, prefix: str = "distributed") -> tuple[dict | None, str | None]:
        """(the DeepSpeed JSON with deepspeed_overrides merged in, None) or (None, what is wrong with it)."""
        if self.deepspeed_config is None:
            return None, f"`{prefix}.deepspeed_config` must name a DeepSpeed JSON file for {prefix}.backend=deepspeed"
        path = deepspeed_config_path(self.deepspeed_config)
        if not path.is_file():
            return None, f"`{prefix}.deepspeed_config={self.deepspeed_config}` does not exist (looked for {path})"
        try:
            config = _merge(json.loads(path.read_text()), self.deepspeed_overrides or {})
        except json.JSONDecodeError as err:
            return None, f"`{prefix}.deepspeed_config={self.deepspeed_config}` is not valid JSON: {err}"
        stage = (config.get("zero_optimization") or {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            return config, f"`zero_optimization.stage={stage}` in {path} must be 0, 1, 2 or 3"
        return config, None

    def deepspeed_settings(self) -> dict | None:
        """The DeepSpeed config this section builds (None: not DeepSpeed, or its JSON is missing or unreadable)."""
        if self.backend != "deepspeed":
            return None
        return self._read_deepspeed()[0]

    def _fsdp_problems(self, prefix: str) -> list[str]:
        fsdp = self.fsdp_config
        if fsdp is None:
            return [f"`{prefix}.fsdp_config` must be a mapping for {prefix}.backend=fsdp"]
        problems = []
        version = fsdp.get("version", 2)
        if version not in (1, 2):
            problems.append(
                f"`{prefix}.fsdp_config.version={version}` must be 1 or 2 (2, per-parameter sharding, is recommended)"
            )
        if str(fsdp.get("cpu_ram_efficient_loading", False)).lower() == "true":
            problems.append(
                f"`{prefix}.fsdp_config.cpu_ram_efficient_loading=true` is not supported: adapters are attached "
                "after loading, which needs real (not meta) base weights on every rank; set it to false"
            )
        return problems


def deepspeed_config_path(value: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return DISTRIBUTED_CONFIG_DIR / path


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def deepspeed_config(distributed: DistributedConfig) -> dict:
    """The DeepSpeed JSON named by `distributed.deepspeed_config`, with `distributed.deepspeed_overrides` merged in."""
    assert distributed.deepspeed_config is not None, "validated by DistributedConfig.check"
    config = json.loads(deepspeed_config_path(distributed.deepspeed_config).read_text())
    return _merge(config, distributed.deepspeed_overrides or {})


def training_arguments_kwargs(distributed: DistributedConfig | None, trainer: TrainerConfig) -> dict[str, Any]:
    """TrainingArguments keys for the chosen engine (validated beforehand by `check` and `config_problems`)."""
    if distributed is None:
        return {}
    kwargs: dict[str, Any] = {"ddp_find_unused_parameters": distributed.ddp_find_unused_parameters}
    if distributed.backend == "deepspeed":
        kwargs["deepspeed"] = deepspeed_config(distributed)
    elif distributed.backend == "fsdp":
        fsdp_config = dict(distributed.fsdp_config or {})
        if trainer.gradient_checkpointing:
            # FSDP checkpoints whole wrapped layers itself; Trainer refuses both kinds at once, and the
            # model-level kind costs FSDP an extra all-gather per layer in backward.
            fsdp_config["activation_checkpointing"] = True
            kwargs["activation_checkpointing"] = False
            kwargs["activation_checkpointing_kwargs"] = None
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp_config
    return kwargs


# -- checks that need more than the section ----------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _launched() -> bool:
    """True under a distributed launcher (even with one process), which DeepSpeed and FSDP need."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def config_problems(
    distributed: DistributedConfig | None, trainer: TrainerConfig, adapter: AdapterSettings, *, quantization: str
) -> list[str]:
    """Problems of the engine with the trainer and adapter settings, the base model's quantization
    (model.quantization) and the launch environment, each naming the key and the fix."""
    if distributed is None:
        return []
    # Imported here: the CLI imports this module before Hydra runs, and peft/transformers load slowly.
    from mora_train.adapters import ADAPTER_TYPES

    method = ADAPTER_TYPES.get(adapter.name)
    backend, ds_config = distributed.backend, distributed.deepspeed_settings()
    problems: list[str] = []
    if backend == "deepspeed":
        problems += _deepspeed_problems(distributed, trainer, ds_config)
    elif backend == "fsdp":
        problems += _fsdp_problems(distributed, method)
    # An accelerate launch config can pick an engine too (ACCELERATE_USE_*); two different engines conflict.
    launcher_engine = (
        "deepspeed" if _env_flag("ACCELERATE_USE_DEEPSPEED") else "fsdp" if _env_flag("ACCELERATE_USE_FSDP") else None
    )
    if launcher_engine and distributed.engine:
        problems.append(
            f"the accelerate launch config selects {launcher_engine} and distributed={distributed.name} selects "
            f"{backend}: choose the engine in one place — launch with a plain multi-GPU accelerate config "
            "(mora_train/configs/distributed/accelerate/multi_gpu.json) and pick it with distributed=..."
        )
    problems += _parallelism_problems(method, ds_config)
    engine = distributed.engine or launcher_engine
    problems += _training_option_problems(trainer, engine, ds_config)
    problems += _quantized_base_problems(quantization, engine, distributed.name)
    return problems


def _parallelism_problems(method: type[Adapter] | None, ds_config: dict | None) -> list[str]:
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


def _deepspeed_problems(distributed: DistributedConfig, trainer: TrainerConfig, config: dict | None) -> list[str]:
    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"distributed={distributed.name} needs DeepSpeed, which is not installed: "
            "pip install 'mora-train[deepspeed]' (or pip install deepspeed)"
        )
    if config is not None:
        problems += _deepspeed_number_problems(
            config, deepspeed_config_path(str(distributed.deepspeed_config)), trainer
        )
    if not _launched():
        problems.append(
            f"distributed={distributed.name} (DeepSpeed) runs under a launcher, even on one GPU: "
            f"`accelerate launch --num_processes 1 -m mora_train distributed={distributed.name} ...` "
            f"or `scripts/launch.sh --gpus 1 distributed={distributed.name} ...`"
        )
    return problems


def _deepspeed_number_problems(config: dict, path: Path, trainer: TrainerConfig) -> list[str]:
    """Numbers the Trainer also sets must agree with ours; "auto" lets the Trainer fill them in."""
    problems = []
    expected = {"train_micro_batch_size_per_gpu": trainer.micro_batch_size, "train_batch_size": trainer.batch_size}
    for key, ours in expected.items():
        value = config.get(key, "auto")
        if value not in ("auto", ours):
            problems.append(f'`{key}: {value}` in {path} disagrees with trainer settings ({ours}); set it to "auto"')
    precision = trainer.precision
    for key, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        enabled = (config.get(key) or {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != wanted:
            problems.append(
                f'`{key}.enabled: {enabled}` in {path} disagrees with trainer.precision={precision}; set it to "auto"'
            )
    return problems


def _fsdp_problems(distributed: DistributedConfig, method: type[Adapter] | None) -> list[str]:
    import torch

    problems = []
    fsdp = distributed.fsdp_config or {}
    frozen_base = method.freezes_base if method else True
    if fsdp.get("version", 2) == 1 and frozen_base and str(fsdp.get("use_orig_params", True)).lower() != "true":
        problems.append(
            "`distributed.fsdp_config.use_orig_params=false` cannot train adapters with FSDP1 (frozen and "
            "trainable weights share flattened shards); set it to true or use version: 2"
        )
    if not torch.cuda.is_available():
        problems.append(
            f"distributed={distributed.name} (FSDP) needs CUDA GPUs (Accelerate applies FSDP only to GPU "
            "processes); on CPU use distributed=none (DDP) or distributed=zero2/zero3"
        )
    elif not _launched():
        problems.append(
            f"distributed={distributed.name} (FSDP) runs under a launcher, even on one GPU: "
            f"`accelerate launch --num_processes 1 -m mora_train distributed={distributed.name} ...`"
        )
    return problems


def _quantized_base_problems(quantization: str, engine: str | None, engine_name: str) -> list[str]:
    """A 4-/8-bit base trains on one GPU or under DDP (each rank holds the whole quantized model); DeepSpeed
    and FSDP shard or cast flat parameter groups, which bitsandbytes' packed codes and their quantization
    state do not survive in our setup (untested: refused rather than silently wrong)."""
    if engine is None or quantization == "none":
        return []
    return [
        (
            f"`model.quantization={quantization}` with `distributed={engine_name}` ({engine}): a quantized base "
            "trains on one GPU or with distributed=ddp (each GPU holds the whole 4-/8-bit model, which is what makes "
            f"it small); {engine} would shard or cast bitsandbytes' packed weights. Use distributed=ddp or none, or "
            "model.quantization=none with this engine"
        )
    ]


def _training_option_problems(trainer: TrainerConfig, engine: str | None, ds_config: dict | None) -> list[str]:
    """ReMoRA/ReLoRA restarts and trained embeddings need whole weights that ZeRO / FSDP split or copy."""
    if engine is None:
        return []
    problems = []
    every = trainer.restart.every_steps
    if every > 0:
        problems.append(
            f"`trainer.restart.every_steps={every}` (ReMoRA/ReLoRA) merges ΔW into the base weights and resets "
            f"optimizer state in place during training, which {engine} keeps sharded or copied; train restarts with "
            "distributed=none or ddp (DDP: every rank merges identically)"
        )
    if trainer.adapter_lr_ratio is not None and "optimizer" in (ds_config or {}):
        problems.append(
            f"`trainer.adapter_lr_ratio={trainer.adapter_lr_ratio:g}` (LoRA+) builds the optimizer's parameter groups, "
            "and this DeepSpeed config builds its own optimizer (its `optimizer` section), which would ignore them; "
            "use distributed=zero2 or zero3 (no optimizer section), or trainer.adapter_lr_ratio=null"
        )
    sharded = engine == "fsdp" or ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0) == 3
    if trainer.train_embeddings and sharded:
        problems.append(
            f"`trainer.train_embeddings=true` saves the live embedding weights with every checkpoint, which "
            f"{engine} shards; use distributed=zero2 or none/ddp"
        )
    return problems

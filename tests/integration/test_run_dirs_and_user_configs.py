"""Where a run writes (no stray outputs/ in the working directory) and configs from a user's own folder."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

TINY = [
    "model=tiny-llama",
    "trainer.max_steps=2",
    "task.num_pairs=2",
    "trainer.batch_size=2",
    "trainer.micro_batch_size=2",
]


def test_output_dir_is_hydras_run_dir_and_nothing_else_lands_in_the_cwd(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli([*TINY, f"output_dir={cwd / 'run'}"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # no outputs/DATE/TIME beside it
    run = cwd / "run"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert len(list(run.rglob("config.yaml"))) == 1  # Hydra's record, once
    # (A run dir outside the working directory leaves nothing at all in it: the user-config run below.)


def test_without_output_dir_the_run_dir_is_hydras_dated_folder(tmp_path: Path) -> None:
    result = run_cli(TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = list((tmp_path / "outputs").glob("*/*"))
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


# The example of docs/configuration.md ("Your own configs"), written as a user would.
MY_MODEL = """\
# model/my-tiny.yaml: a tiny random Llama of one's own
name_or_path: null
package: null
tokenizer: byte
dtype: float32
trust_remote_code: false
revision: null
cache_dir: ~/.cache/mora-train
random_init:
  architecture: llama
  hidden_size: 32
  intermediate_size: 64
  num_hidden_layers: 1
  num_attention_heads: 2
  num_key_value_heads: 1
  max_position_embeddings: 256
  tie_word_embeddings: false
"""
MY_TASK = """\
# task/my-uuid.yaml: the UUID recipe with settings of one's own
name: uuid
num_pairs: 3
data_seed: 7
prompt_template: "ID {key} ->"
completion_template: " {value}"
eval:
  max_samples: null
  batch_size: 4
"""


def write_user_configs(folder: Path) -> None:
    (folder / "model").mkdir(parents=True)
    (folder / "task").mkdir()
    (folder / "model" / "my-tiny.yaml").write_text(MY_MODEL)
    (folder / "task" / "my-uuid.yaml").write_text(MY_TASK)


def assert_composed_from_user_configs(config_yaml: str) -> None:
    assert "hidden_size: 32" in config_yaml and "num_pairs: 3" in config_yaml
    assert "ID {key} ->" in config_yaml and "name: uuid" in config_yaml


def test_user_config_folder_adds_model_and_task_options(tmp_path: Path) -> None:
    mine = tmp_path / "my-configs"
    write_user_configs(mine)
    shown = run_cli(
        [f"hydra.searchpath=[file://{mine}]", "model=my-tiny", "task=my-uuid", "--cfg", "job"], cwd=tmp_path
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert_composed_from_user_configs(shown.stdout)
    # And a tiny run with them through --config-dir, from a working directory the run dir is outside of:
    # nothing at all is created in it.
    cwd, run = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    result = run_cli(
        [f"--config-dir={mine}", "model=my-tiny", "task=my-uuid", *TINY[1:2], *TINY[3:], f"output_dir={run}"], cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    assert json.loads((run / "metrics.json").read_text())["task"] == "uuid"
    assert_composed_from_user_configs((run / ".hydra" / "config.yaml").read_text())

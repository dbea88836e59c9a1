"""eval.backend / eval.lm_eval.*: every problem in one ConfigError naming key and fix; the shipped lm-eval task
files (configs/lm_eval/) and how their data paths are resolved; the harness's section of metrics.json."""

from __future__ import annotations

import importlib.util
import json
from fnmatch import fnmatch
from pathlib import Path

import pytest

from mora_train.config.schema import parse
from mora_train.core.errors import ConfigError
from mora_train.core.metrics import make_record, metrics_of, primary_value, score
from mora_train.evaluation import lm_harness
from mora_train.evaluation.config import (
    GenerationEvalSettings,
    InstructionEvalSettings,
    LmEvalConfig,
    PerplexityEvalSettings,
    UuidEvalSettings,
)
from mora_train.pipeline.run_config import read_run_config
from tests.conftest import CONFIG_DIR, REPO, SHARED_DATA, compose_config

SHIPPED = [
    "gsm8k",
    "pubmedqa",
    "mmlu_medical",
    "mmlu_anatomy",
    "mmlu_clinical_knowledge",
    "mmlu_college_biology",
    "mmlu_college_medicine",
    "mmlu_medical_genetics",
    "mmlu_professional_medicine",
]


def config_problems(cfg) -> list[str]:
    """What pipeline.validate reports of the eval section: its own problems (types, ranges, the backend), and
    the harness's (installed, task names, data files) when it runs."""
    run, found = read_run_config(cfg)
    task_name = run.task.name if hasattr(run.task, "name") else run.task["name"]
    return found + lm_harness.config_problems(run.eval, task_name)


def validate(cfg) -> None:
    found = config_problems(cfg)
    if found:
        raise ConfigError(found)


def problems(overrides: list[str], tmp_path: Path) -> list[str]:
    found = config_problems(compose_config(["model=tiny-llama", *overrides], tmp_path))
    assert found
    return found


def data_dir_with_gsm8k(tmp_path: Path) -> Path:
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "data" / "gsm8k" / f"{split}.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    return tmp_path / "data"


def test_default_backend_is_the_task_and_needs_nothing(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_config(["model=tiny-llama", "data_dir=null"], tmp_path)
    assert cfg.eval.backend == "task" and cfg.eval.lm_eval.tasks is None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else _find_spec(name, *a)
    )
    validate(cfg)  # no harness, no tasks, no data: fine while the harness is not selected


_find_spec = importlib.util.find_spec


def test_harness_settings_are_checked_only_when_it_runs(tmp_path: Path) -> None:
    """Types and ranges of eval.lm_eval are the section's (always); files and task names only with the harness."""
    cfg = compose_config(
        ["model=tiny-llama", "eval.lm_eval.tasks=[nope]", f"eval.lm_eval.include_path=[{tmp_path / 'x'}]"], tmp_path
    )
    validate(cfg)  # eval.backend=task: the harness's task names and folders are not looked up
    found = problems(["eval.lm_eval.batch_size=0", "eval.lm_eval.max_gen_toks=0", "eval.lm_eval.tasks=gsm8k"], tmp_path)
    assert "`eval.lm_eval.batch_size=0` must be at least 1" in found
    assert any(p.startswith("`eval.lm_eval.max_gen_toks=0` must be at least 1") for p in found)
    assert any(p.startswith("`eval.lm_eval.tasks` must be a list of str or null, got 'gsm8k'") for p in found)


def test_an_empty_task_list_suggests_the_training_tasks_benchmark(tmp_path: Path) -> None:
    found = problems(["task=biomed", "eval.backend=lm_eval", f"data_dir={tmp_path}"], tmp_path)
    assert any(
        "`eval.lm_eval.tasks` is empty" in p and "eval.lm_eval.tasks=[pubmedqa,mmlu_medical]" in p for p in found
    )


def test_task_eval_settings_keep_their_messages() -> None:
    def check(cls, values: dict) -> list[str]:
        found: list[str] = []
        parse(cls, values, "task.eval", found)
        return found

    assert check(UuidEvalSettings, {"max_samples": 0, "batch_size": -1}) == [
        "`task.eval.max_samples=0` must be a positive integer or null (all)",
        "`task.eval.batch_size=-1` must be a positive integer",
    ]
    assert check(GenerationEvalSettings, {"max_new_tokens": 0, "stop": ["", "x"]}) == [
        "`task.eval.max_new_tokens=0` must be a positive integer",
        "`task.eval.stop=['', 'x']` must be a list of non-empty strings (may be empty: [])",
    ]
    assert check(GenerationEvalSettings, {"stop": []}) == []
    assert check(InstructionEvalSettings, {"num_generations": -1}) == [
        "`task.eval.num_generations=-1` must be a non-negative integer"
    ]
    assert check(InstructionEvalSettings, {"num_generations": 0}) == []
    assert check(PerplexityEvalSettings, {"max_len": 0, "benchmarks": ["a"]}) == [
        "`task.eval.max_len=0` must be a positive integer"
    ]
    assert (
        "`task.eval.benchmarks` must be a list of str or null" in check(PerplexityEvalSettings, {"benchmarks": "a"})[0]
    )
    assert (
        "`task.eval.max_sample` is not a known key (did you mean max_samples?)"
        in check(UuidEvalSettings, {"max_sample": 1})[0]
    )


def test_shipped_tasks_are_indexed() -> None:
    index = lm_harness.index_tasks([lm_harness.SHIPPED_TASK_DIR])
    assert sorted(index.names) == sorted(SHIPPED) and not index.unreadable
    assert index.members("mmlu_medical") == SHIPPED[3:]
    assert index.tasks["gsm8k"]["dataset_kwargs"]["data_files"] == {
        "train": "gsm8k/train.jsonl",
        "test": "gsm8k/test.jsonl",
    }
    # The included template is merged in (lm-eval's `include:`).
    assert index.tasks["mmlu_anatomy"]["output_type"] == "multiple_choice"


def test_all_problems_at_once_each_naming_key_and_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else _find_spec(name, *a)
    )
    found = problems(
        [
            "eval.backend=lm_eval",
            "eval.lm_eval.tasks=[gsm8k,hellaswag]",
            "eval.lm_eval.limit=0",
            "eval.lm_eval.batch_size=big",
            "eval.lm_eval.num_fewshot=-1",
            "+eval.lm_eval.shots=3",
            f"eval.lm_eval.data_dir={tmp_path / 'nowhere'}",
        ],
        tmp_path,
    )
    text = "\n".join(found)
    assert "`eval.lm_eval.shots` is not a known key" in text
    assert "`eval.lm_eval.limit=0` must be at least 1" in text
    assert "`eval.lm_eval.batch_size=big` must be a positive integer or auto" in text
    assert "`eval.lm_eval.num_fewshot=-1` must be 0 or more" in text
    assert "lm-evaluation-harness, which is not installed: pip install 'mora-train[lm-eval]'" in text
    assert "or use eval.backend=task" in text
    unknown = next(p for p in found if "unknown lm-eval tasks" in p)
    assert "hellaswag" in unknown and ", ".join(sorted(SHIPPED)) in unknown and "eval.lm_eval.include_path" in unknown
    missing = next(p for p in found if "do not exist" in p)
    assert str(tmp_path / "nowhere" / "gsm8k" / "test.jsonl") in missing and "eval.lm_eval.data_dir" in missing
    assert "Traceback" not in text


def test_unknown_backend_and_missing_tasks_or_data_dir(tmp_path: Path) -> None:
    assert any("`eval.backend=harness` is unknown; use task" in p for p in problems(["eval.backend=harness"], tmp_path))
    found = problems(["eval.backend=both"], tmp_path)
    assert any("`eval.lm_eval.tasks` is empty" in p and "eval.lm_eval.tasks=[gsm8k]" in p for p in found)
    found = problems(["eval.backend=lm_eval", "eval.lm_eval.tasks=[mmlu_medical]", "data_dir=null"], tmp_path)
    assert any(
        "`eval.lm_eval.data_dir` is null" in p and "mmlu_anatomy" in p and "data_dir=/path/to/data" in p for p in found
    )
    found = problems(
        [
            "eval.backend=lm_eval",
            "eval.lm_eval.tasks=[gsm8k]",
            f"eval.lm_eval.include_path=[{tmp_path / 'x'}]",
            f"eval.lm_eval.data_dir={data_dir_with_gsm8k(tmp_path)}",
        ],
        tmp_path,
    )
    assert found == [
        (
            f"`eval.lm_eval.include_path` names folders that do not exist: {tmp_path / 'x'}; give folders of "
            "lm-eval task YAML files"
        )
    ]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_valid_settings_pass(tmp_path: Path) -> None:
    data_dir = data_dir_with_gsm8k(tmp_path)
    validate(
        compose_config(
            [
                "model=tiny-llama",
                "eval.backend=lm_eval",
                "eval.lm_eval.tasks=[gsm8k]",
                f"data_dir={data_dir}",
                "eval.lm_eval.limit=0.5",
                "eval.lm_eval.batch_size=auto",
            ],
            tmp_path,
        )
    )
    # A task folder of the user's: its data_files may be absolute, or relative to the data dir like the shipped ones.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tiny.yaml").write_text(
        f"task: tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{data_dir / 'gsm8k' / 'test.jsonl'}\n"
    )
    validate(
        compose_config(
            [
                "model=tiny-llama",
                "eval.backend=both",
                "eval.lm_eval.tasks=[tiny,gsm8k]",
                f"eval.lm_eval.include_path=[{mine}]",
                f"data_dir={data_dir}",
            ],
            tmp_path,
        )
    )


def test_task_folders_are_copied_with_data_paths_resolved(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.yaml").write_text(
        "task: a\ndataset_path: json\nprocess_docs: !function utils.keep\n"
        "dataset_kwargs: {data_files: {test: [a/1.jsonl, /abs/2.jsonl]}}\n"
    )
    (mine / "utils.py").write_text("def keep(d):\n    return d\n")
    folders = lm_harness.write_task_dirs(LmEvalConfig(data_dir="/data", include_path=[str(mine)]), tmp_path / "out")
    assert [f.name for f in folders] == ["shipped", "include_1_mine"]
    gsm8k = lm_harness.read_task_file(folders[0] / "gsm8k.yaml")
    assert gsm8k["dataset_kwargs"]["data_files"] == {
        "train": "/data/gsm8k/train.jsonl",
        "test": "/data/gsm8k/test.jsonl",
    }
    assert gsm8k["doc_to_text"] == "Question: {{question}}\nAnswer:"  # the prompt round-trips unchanged
    a = lm_harness.read_task_file(folders[1] / "a.yaml")
    assert a["dataset_kwargs"]["data_files"] == {"test": ["/data/a/1.jsonl", "/abs/2.jsonl"]}
    assert isinstance(a["process_docs"], lm_harness.FunctionRef) and a["process_docs"] == "utils.keep"
    assert (folders[1] / "utils.py").is_file()  # `!function` helpers travel with their task files
    pubmedqa = (folders[0] / "pubmedqa.yaml").read_text()
    assert "process_docs: !function 'mora_train.evaluation.lm_harness.pubmedqa_test_split'" in pubmedqa


def test_every_shipped_task_file_ships_in_the_wheel() -> None:
    """pyproject's package-data globs cover configs/lm_eval/, the included `..._yaml` template too."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "mora_train.configs"
    ]
    for path in lm_harness.SHIPPED_TASK_DIR.iterdir():
        relative = str(path.relative_to(CONFIG_DIR))
        assert any(fnmatch(relative, g) or fnmatch(relative, g.removeprefix("**/")) for g in globs), relative


def test_metrics_json_lm_eval_section() -> None:
    section = {
        "version": "0.4.13",
        "settings": {"tasks": ["gsm8k"]},
        "higher_is_better": {"gsm8k": {"exact_match": True}},
        "results": {"gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}},
    }
    assert lm_harness.primary(section, ["gsm8k"]) == ("lm_eval/gsm8k/exact_match,strict-match", True)
    record = make_record({"task": "gsm8k"}, "lm_eval/gsm8k/exact_match,strict-match", True, {}, lm_eval=section)
    assert metrics_of(record) == {"lm_eval/gsm8k/exact_match,strict-match": 0.25}  # no stderr
    assert primary_value(record) == 0.25 and score(record) == 0.25
    both = make_record({"task": "gsm8k"}, "accuracy", True, {"accuracy": 0.5}, lm_eval=section)
    assert (
        list(metrics_of(both)) == ["accuracy", "lm_eval/gsm8k/exact_match,strict-match"] and primary_value(both) == 0.5
    )
    with pytest.raises(ValueError, match="reserves"):
        make_record({"task": "x"}, "lm_eval", True, {"lm_eval": 1.0})
    assert "lm_eval" not in make_record({"task": "x"}, "accuracy", True, {"accuracy": 1.0})


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_pubmedqa_task_keeps_the_official_test_split() -> None:
    datasets = pytest.importorskip("datasets")
    records = datasets.load_dataset("json", data_files=str(SHARED_DATA / "pubmedqa" / "ori_pqal.jsonl"), split="train")
    kept = lm_harness.pubmedqa_test_split(records)
    ids = json.loads((CONFIG_DIR / "data" / "pubmedqa" / "test_ground_truth.json").read_text())
    assert len(kept) == 500 and {r["pubid"]: r["final_decision"] for r in kept} == ids

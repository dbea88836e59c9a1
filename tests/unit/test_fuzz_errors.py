"""Fuzzing the error boundary (issue 18): random config overrides (valid and invalid values of every key) and
random corruptions of data files, checkpoints and model folders, run in-process through validation and
loading. The property: a clean project error (MoraTrainError, ConfigError included) or success — never any
other exception (which the CLI would report as a bug).

The default run keeps each fuzzer to a few seconds (FAST examples); `pytest -m slow` runs the long profile.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from mora_train.core.errors import MoraTrainError
from tests.conftest import compose_config

FAST, LONG = 25, 400
CASES: dict[str, int] = {}  # examples run per fuzzer (printed with -s; the report quotes them)

BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]


def fuzz(name: str, budget: int, strategy: st.SearchStrategy, check: Callable[[Any], None]) -> None:
    """Run `check` on `budget` examples of `strategy`; count them under `name`."""

    @settings(max_examples=budget, deadline=None, database=None, derandomize=budget == FAST,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def property_holds(example: Any) -> None:
        CASES[name] = CASES.get(name, 0) + 1
        try:
            check(example)
        except MoraTrainError:
            pass  # a clean error: what the CLI prints as one paragraph

    property_holds()
    print(f"\nfuzz {name}: {CASES.get(name, 0)} cases")


# -- config overrides ---------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
VALID = {
    "rank": st.sampled_from([1, 4, 8, 64]),
    "seed": st.integers(0, 2**31),
    "trainer.max_steps": st.sampled_from([-1, 0, 1, 20]),
    "trainer.num_epochs": st.sampled_from([1, 2, 0.5]),
    "trainer.learning_rate": st.sampled_from([1e-4, 2e-3, "1e-3"]),
    "trainer.batch_size": st.sampled_from([1, 2, 8]),
    "trainer.micro_batch_size": st.sampled_from([1, 2, 8]),
    "trainer.lr_scheduler": st.sampled_from(["cosine", "linear", "constant", "no_such_schedule"]),
    "trainer.warmup_steps": st.sampled_from([0, 5]),
    "trainer.weight_decay": st.sampled_from([0.0, 0.1]),
    "trainer.max_grad_norm": st.sampled_from([0.0, 1.0]),
    "trainer.max_seq_len": st.sampled_from([8, 256]),
    "trainer.precision": st.sampled_from(["fp32", "bf16", "fp16", "fp8"]),
    "trainer.gradient_checkpointing": st.booleans(),
    "trainer.logging_steps": st.sampled_from([1, 5]),
    "trainer.save_steps": st.sampled_from([0, 2]),
    "trainer.save_total_limit": st.sampled_from([None, 1, 2]),
    "trainer.resume": st.sampled_from(["auto", True, False, "/no/such/checkpoint"]),
    "trainer.nonfinite_loss": st.sampled_from(["stop", "skip"]),
    "adapter.dropout": st.sampled_from([0.0, 0.1]),
    "adapter.mora_type": st.sampled_from(["rope", "sharing", 1, 6, "decouple", "truncation"]),
    "adapter.target_modules": st.sampled_from([["q_proj"], ["q_proj", "v_proj"], "all", ["nope_proj"]]),
    "model.dtype": st.sampled_from(["float32", "bfloat16", "auto", "float8"]),
    "model.trust_remote_code": st.booleans(),
    "model.name_or_path": st.sampled_from([None, "./no/such/dir", "org/model", "x.gguf"]),
    "model.random_init.hidden_size": st.sampled_from([16, 64, 65]),
    "task.num_pairs": st.sampled_from([1, 4]),
    "task.eval.max_samples": st.sampled_from([None, 1]),
    "mode": st.sampled_from(["train", "eval", "predict"]),
    "checkpoint": st.sampled_from([None, "/no/such/run"]),
    "eval.backend": st.sampled_from(["task", "lm_eval", "both", "harness"]),
    "eval.lm_eval.tasks": st.sampled_from([None, ["gsm8k"], ["mmlu_medical", "nope"], "gsm8k"]),
    "eval.lm_eval.limit": st.sampled_from([None, 3, 0.5, 0, 2.5]),
    "eval.lm_eval.data_dir": st.sampled_from([None, "/no/such/data"]),
    "eval.lm_eval.include_path": st.sampled_from([[], ["/no/such/tasks"], "tasks"]),
}
ADAPTERS = ["lora", "mora", "full"]
_BASE: dict[str, Any] = {}


def base_config(adapter: str):
    if adapter not in _BASE:
        _BASE[adapter] = compose_config(["model=tiny-llama", f"adapter={adapter}"])
    return _BASE[adapter].copy()


overrides = st.tuples(
    st.sampled_from(ADAPTERS),
    st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.one_of(VALID[k], JUNK) for k in keys})
    ),
)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_config_overrides(budget: int, tmp_path: Path) -> None:
    from mora_train.pipeline.train import check_run_dir
    from mora_train.pipeline.validate import validate
    from mora_train.adapters import adapter_identity
    from mora_train.training.checkpoints import decide_resume

    def check(example: tuple[str, dict]) -> None:
        adapter, values = example
        cfg = base_config(adapter)
        with open_dict(cfg):
            for key, value in values.items():
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)  # as key=value on the command line
            cfg.output_dir = str(tmp_path / "run")
        validate(cfg)
        run_dir = check_run_dir(cfg)
        decide_resume(run_dir, cfg.trainer.resume, bool(cfg.get("overwrite")), adapter_identity(cfg.adapter, cfg.rank))

    fuzz("config overrides", budget, overrides, check)


# -- data files --------------------------------------------------------------------------------------------

RECORDS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]
FORMATS = {
    ".jsonl": lambda: "".join(json.dumps(r) + "\n" for r in RECORDS).encode(),
    ".json": lambda: json.dumps(RECORDS).encode(),
    ".csv": lambda: ("question,answer\n" + "".join(f'"{r["question"]}","{r["answer"]}"\n' for r in RECORDS)).encode(),
}


def corrupt_bytes(data: bytes, kind: str, at: float, value: int) -> bytes:
    pos = int(at * max(len(data) - 1, 0))
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ (value or 1)]) + data[pos + 1:] if data else data
    if kind == "insert":
        return data[:pos] + bytes([value]) * 3 + data[pos:]
    if kind == "invalid_utf8":
        return data[:pos] + b"\xff\xfe" + data[pos:]
    if kind == "empty":
        return b""
    if kind == "binary":
        return bytes(range(256)) * 4
    if kind == "huge_line":
        return data + b'{"question": "' + b"x" * 200_000 + b'", "answer": "1"}\n'
    if kind == "wrong_json":
        return b'[1, 2, "three"]\n{"a": [\n'
    return data


CORRUPTIONS = ["truncate", "flip", "insert", "invalid_utf8", "empty", "binary", "huge_line", "wrong_json", "none"]
corruption = st.tuples(st.sampled_from(CORRUPTIONS), st.floats(0, 1), st.integers(0, 255))


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_data_files(budget: int, tmp_path: Path) -> None:
    from mora_train.data.math import tokenize_train
    from mora_train.models import byte_tokenizer

    tokenizer = byte_tokenizer()

    def check(example: tuple[str, tuple[str, float, int], dict]) -> None:
        suffix, (kind, at, value), fields = example
        path = tmp_path / f"train{suffix}"
        path.write_bytes(corrupt_bytes(FORMATS[suffix](), kind, at, value))
        cfg = compose_config(["model=tiny-llama", "task=gsm8k", "task.cache_dir=null", f"task.data.train={path}"])
        with open_dict(cfg):
            for key, field in fields.items():
                cfg.task.data.fields[key] = field
        tokenize_train(cfg.task, tokenizer, 64)

    fields = st.dictionaries(st.sampled_from(["question", "answer"]),
                             st.sampled_from(["question", "answer", "missing", "{question} {answer}", "a.0.b", "{", ""]),
                             max_size=2)
    fuzz("data files", budget, st.tuples(st.sampled_from(sorted(FORMATS)), corruption, fields), check)


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_checkpoints(budget: int, tmp_path: Path) -> None:
    from mora_train.training.checkpoints import COMPLETE_MARKER, STAGING_DIR, apply_resume_plan, decide_resume, publish

    template = tmp_path / "template"
    for step in (2, 4):
        staged = template / "checkpoints" / STAGING_DIR / f"checkpoint-{step}"
        staged.mkdir(parents=True)
        (staged / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
        (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (staged / "optimizer.pt").write_bytes(b"\x80\x04" + b"o" * 300)
        publish(staged, template / "checkpoints" / f"checkpoint-{step}", {"step": step, "adapter": "lora", "rank": 8})
    names = ["adapter_model.safetensors", "trainer_state.json", "optimizer.pt", COMPLETE_MARKER]

    def check(example: tuple[int, str, tuple[str, float, int], Any]) -> None:
        step, name, (kind, at, value), resume = example
        run_dir = tmp_path / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(template, run_dir)
        target = run_dir / "checkpoints" / f"checkpoint-{step}" / name
        if kind == "empty" and at < 0.3:
            target.unlink()
        else:
            target.write_bytes(corrupt_bytes(target.read_bytes(), kind, at, value))
        resume = str(run_dir / "checkpoints" / f"checkpoint-{step}") if resume == "path" else resume
        plan = decide_resume(run_dir, resume, False, {"adapter": "lora", "rank": 8})
        apply_resume_plan(plan)

    example = st.tuples(st.sampled_from([2, 4]), st.sampled_from(names), corruption,
                        st.sampled_from(["auto", True, "path"]))
    fuzz("checkpoints", budget, example, check)


# -- model folders -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_model_folders(budget: int, tmp_path: Path) -> None:
    from mora_train.models import load_model_and_tokenizer

    cfg = compose_config(["model=tiny-llama"])
    template = tmp_path / "template"
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.save_pretrained(template)
    tokenizer.save_pretrained(template)
    names = sorted(p.name for p in template.iterdir())
    with open_dict(cfg):
        cfg.model.random_init = None
        cfg.model.tokenizer = None

    def check(example: tuple[str, tuple[str, float, int], bool]) -> None:
        name, (kind, at, value), byte_tokenizer = example
        folder = tmp_path / "model"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(template, folder)
        target = folder / name
        if kind == "empty" and at < 0.3:
            target.unlink()
        else:
            target.write_bytes(corrupt_bytes(target.read_bytes(), kind, at, value))
        model_cfg = cfg.model.copy()
        with open_dict(model_cfg):
            model_cfg.name_or_path = str(folder)
            model_cfg.tokenizer = "byte" if byte_tokenizer else None
        load_model_and_tokenizer(model_cfg)

    fuzz("model folders", budget, st.tuples(st.sampled_from(names), corruption, st.booleans()), check)

"""Fuzzing the error boundary: random config overrides (valid and invalid values of every key) and
random corruptions of data files, checkpoints and model folders, run in-process through validation and
loading. The property: a clean project error (MoraTrainError, ConfigError included) or success — never any
other exception (which the CLI would report as a bug). Two families check more than that: output targets
(each writing command refuses exactly the targets it must not write, naming them, and touches nothing) and
concurrent writers (a run dir held by another live process is refused to writers and readers, naming it).

The default run keeps each fuzzer to a few seconds (FAST examples); `pytest -m slow` runs the long profile.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    @settings(
        max_examples=budget,
        deadline=None,
        database=None,
        derandomize=budget == FAST,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def property_holds(example: Any) -> None:
        CASES[name] = CASES.get(name, 0) + 1
        with contextlib.suppress(MoraTrainError):  # a clean error: what the CLI prints as one paragraph
            check(example)

    property_holds()
    print(f"\nfuzz {name}: {CASES.get(name, 0)} cases")


# -- config overrides ---------------------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
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
    "trainer.packing": st.booleans(),
    "trainer.eval_steps": st.sampled_from([0, 2, 3, -1]),
    "trainer.early_stopping_patience": st.sampled_from([0, 2, -1]),
    "trainer.early_stopping_threshold": st.sampled_from([0.0, 0.01, -1.0]),
    "trainer.load_best": st.booleans(),
    "trainer.sample_every": st.sampled_from([0, 2, -2]),
    "trainer.num_samples": st.sampled_from([1, 3, 0]),
    "trainer.sample_max_new_tokens": st.sampled_from([8, 0]),
    "task.val_size": st.sampled_from([None, 0.25, 2, 0, 1.0, 1.5, 8]),
    "adapter.dropout": st.sampled_from([0.0, 0.1]),
    "adapter.mora_type": st.sampled_from(["rope", "sharing", 1, 6, "decouple", "truncation"]),
    "adapter.target_modules": st.sampled_from([["q_proj"], ["q_proj", "v_proj"], "all", ["nope_proj"]]),
    "model.dtype": st.sampled_from(["float32", "bfloat16", "auto", "float8"]),
    "model.trust_remote_code": st.booleans(),
    "model.attn_implementation": st.sampled_from([None, "eager", "sdpa", "flash_attention_2", "flex_attention"]),
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
    from mora_train.adapters import adapter_identity
    from mora_train.pipeline.run_dir import check_run_dir
    from mora_train.training.resume import decide_resume
    from tests.conftest import validate_config as validate

    def check(example: tuple[str, dict]) -> None:
        adapter, values = example
        cfg = base_config(adapter)
        with open_dict(cfg):
            for key, value in values.items():
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)  # as key=value on the command line
            cfg.output_dir = str(tmp_path / "run")
        config = validate(cfg)
        run_dir = check_run_dir(config)
        decide_resume(run_dir, config.trainer.resume, config.overwrite, adapter_identity(config.adapter, config.rank))

    fuzz("config overrides", budget, overrides, check)


# -- data files --------------------------------------------------------------------------------------------

RECORDS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]


def csv_bytes() -> bytes:
    return ("question,answer\n" + "".join(f'"{r["question"]}","{r["answer"]}"\n' for r in RECORDS)).encode()


FORMATS = {
    ".jsonl": lambda: "".join(json.dumps(r) + "\n" for r in RECORDS).encode(),
    ".json": lambda: json.dumps(RECORDS).encode(),
    ".csv": csv_bytes,
}


def corrupt_bytes(data: bytes, kind: str, at: float, value: int) -> bytes:
    pos = int(at * max(len(data) - 1, 0))
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ (value or 1)]) + data[pos + 1 :] if data else data
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
    from mora_train.pipeline.run_config import read_run_config

    tokenizer = byte_tokenizer()

    def check(example: tuple[str, tuple[str, float, int], dict]) -> None:
        suffix, (kind, at, value), fields = example
        path = tmp_path / f"train{suffix}"
        path.write_bytes(corrupt_bytes(FORMATS[suffix](), kind, at, value))
        cfg = compose_config(["model=tiny-llama", "task=gsm8k", "task.cache_dir=null", f"task.data.train={path}"])
        with open_dict(cfg):
            for key, field in fields.items():
                cfg.task.data.fields[key] = field
        tokenize_train(read_run_config(cfg)[0].task, tokenizer, 64)

    fields = st.dictionaries(
        st.sampled_from(["question", "answer"]),
        st.sampled_from(["question", "answer", "missing", "{question} {answer}", "a.0.b", "{", ""]),
        max_size=2,
    )
    fuzz("data files", budget, st.tuples(st.sampled_from(sorted(FORMATS)), corruption, fields), check)


# -- chat templates and packing -----------------------------------------------------------------------------

CHAT_RECORDS = [
    {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
    {"instruction": "Say hi", "input": "", "output": "hi"},
]
TEMPLATES = st.one_of(
    st.sampled_from(["tokenizer", "chatml", "llama3", "qwen", "vicuna", "/no/such/template.jinja", "FILE"]),
    JUNK,
)
TEMPLATE_FILES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",
            "{% generation %}{% endgeneration %}",
            "{{ raise_exception('no') }}",
            "{% for m in messages %}",
            "{{ messages[7]['content'] }}",
        ]
    ),
)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_chat_templates_and_packing(budget: int, tmp_path: Path) -> None:
    """task.chat_template / train_on / use_chat_template (names, junk, template files with any text) through
    validation and the instruction data build, then the packed rows of what was built."""
    from mora_train.data.packing import training_rows
    from mora_train.models import byte_tokenizer
    from mora_train.tasks import TASKS
    from tests.conftest import validate_config as validate

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_RECORDS))

    def check(example: tuple[Any, str, Any, Any, Any]) -> None:
        template, text, train_on, use_template, max_seq_len = example
        if template == "FILE":
            template = str(tmp_path / "template.jinja")
            Path(template).write_text(text)
        cfg = compose_config(["model=tiny-llama", "task=instruction", "task.cache_dir=null"], tmp_path / "run")
        with open_dict(cfg):
            for key, value in (
                ("task.data.train", str(data)),
                ("task.data.eval", str(data)),
                ("task.data.fields.input", "input"),
                ("task.data.fields.output", "output"),
                ("task.chat_template", template),
                ("task.train_on", train_on),
                ("task.use_chat_template", use_template),
                ("trainer.max_seq_len", max_seq_len),
                ("trainer.packing", True),
            ):
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        config = validate(cfg)
        built = TASKS["instruction"].build(config.task, byte_tokenizer(), config.trainer.max_seq_len)
        rows = training_rows(built.train, config.trainer.max_seq_len, packing=True)
        assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in built.train for t in e["input_ids"])

    strategy = st.tuples(
        TEMPLATES,
        TEMPLATE_FILES,
        st.one_of(st.sampled_from(["all_assistant", "last_assistant"]), JUNK),
        st.one_of(st.sampled_from(["auto", True, False]), JUNK),
        st.sampled_from([8, 24, 256]),
    )
    fuzz("chat templates and packing", budget, strategy, check)


# -- data keys: sources through datasets ---------------------------------------------------------------------

WEIGHT = st.one_of(st.none(), st.sampled_from([1, 2.5, 0, -1, "3", "heavy", float("nan"), float("inf")]))
# Unweighted lists, weighted ones, and any weights at all (a single weighted source, some weighted, bad values).
WEIGHTS = st.one_of(
    st.lists(st.none(), min_size=1, max_size=3),
    st.lists(st.sampled_from([1, 2.5, 3]), min_size=2, max_size=3),
    st.lists(WEIGHT, min_size=1, max_size=3),
)
DATA_KEYS = {
    "task.data.mixing_stop": st.sampled_from(["first_exhausted", "all_exhausted", "longest"]),
    "task.data.mixing_seed": st.sampled_from([0, 7, "seed"]),
    "task.num_proc": st.sampled_from([None, 1, 2, 0, -3]),
    "trainer.max_steps": st.sampled_from([-1, 0, 3, 3]),
}


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_data_keys(budget: int, tmp_path: Path) -> None:
    """Weights, mixing, streaming and num_proc: a clean error or data that builds (the sources and their weights
    vary too: one, two or three, each weighted or not)."""
    from mora_train.models import byte_tokenizer
    from mora_train.tasks import TASKS
    from tests.conftest import validate_config as validate

    files = []
    for i in range(3):
        path = tmp_path / f"text{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"source {i} document {n}"}) + "\n" for n in range(5 + 10 * i)))
        files.append(str(path))
    tokenizer = byte_tokenizer()
    base = compose_config(["model=tiny-llama", "task=pretrain", f"task.cache_dir={tmp_path / 'cache'}"])
    built = []

    def check(example: tuple[list, bool | str, dict]) -> None:
        weights, streaming, values = example
        cfg = base.copy()
        with open_dict(cfg):
            chosen = zip(files[: len(weights)], weights, strict=True)
            sources = [{"path": f} if w is None else {"path": f, "weight": w} for f, w in chosen]
            OmegaConf.update(cfg, "task.data.train", sources, merge=False, force_add=True)
            OmegaConf.update(cfg, "task.data.eval", files[0], merge=False, force_add=True)
            OmegaConf.update(cfg, "task.data.streaming", streaming, merge=False, force_add=True)
            for key, value in values.items():
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            cfg.output_dir = str(tmp_path / "run")
        config = validate(cfg)
        data = TASKS["pretrain"].build(config.task, tokenizer, 16)
        assert data.train[:1][0]["input_ids"]
        built.append(config.task.data.streaming)

    keys = st.dictionaries(st.sampled_from(sorted(DATA_KEYS)), st.none(), max_size=4).flatmap(
        # Valid values twice as often as junk: most cases get as far as building the data.
        lambda chosen: st.fixed_dictionaries({k: st.one_of(DATA_KEYS[k], DATA_KEYS[k], JUNK) for k in chosen})
    )
    fuzz("data keys", budget, st.tuples(WEIGHTS, st.sampled_from([True, False, "yes"]), keys), check)
    print(f"fuzz data keys: {len(built)} built, {sum(built)} of them streamed")


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_checkpoints(budget: int, tmp_path: Path) -> None:
    from mora_train.training.checkpoints import COMPLETE_MARKER, STAGING_DIR, publish
    from mora_train.training.resume import apply_resume_plan, decide_resume

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

    example = st.tuples(
        st.sampled_from([2, 4]), st.sampled_from(names), corruption, st.sampled_from(["auto", True, "path"])
    )
    fuzz("checkpoints", budget, example, check)


# -- model folders -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_model_folders(budget: int, tmp_path: Path) -> None:
    import dataclasses

    from mora_train.models import load_model_and_tokenizer
    from tests.conftest import typed_config

    tiny = typed_config(["model=tiny-llama"]).model
    template = tmp_path / "template"
    model, tokenizer = load_model_and_tokenizer(tiny)
    model.save_pretrained(template)
    tokenizer.save_pretrained(template)
    names = sorted(p.name for p in template.iterdir())

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
        load_model_and_tokenizer(
            dataclasses.replace(
                tiny, random_init=None, name_or_path=str(folder), tokenizer="byte" if byte_tokenizer else None
            )
        )

    fuzz("model folders", budget, st.tuples(st.sampled_from(names), corruption, st.booleans()), check)


# -- output targets ----------------------------------------------------------------------------------------
# Every command that writes a path the user named, through its own check (before any model loads): a target it
# must not write is a MoraTrainError naming the path, never an OSError or a traceback, and nothing is touched.

TARGETS = [
    "blank",
    "spaces",
    "new",
    "empty",
    "file",
    "foreign",
    "source",
    "inside",
    "source_file",
    "root",
    "link_to_source",
    "inside_link",
    "under_file",
    "foreign_link",
    "dev_null",
    "ours",
    "random",
]
REFUSED_BY_ALL = {
    "blank",
    "spaces",
    "file",
    "foreign",
    "source",
    "inside",
    "source_file",
    "link_to_source",
    "inside_link",
    "under_file",
    "foreign_link",
    "dev_null",
}
ACCEPTED_BY_ALL = {"new", "empty", "ours"}
COMMANDS = ["export", "generate", "report", "spectrum"]


def _output_area(root: Path, command: str) -> dict[str, Path]:
    """A source (what `command` reads), a foreign folder with files of every command's names, a plain file, an
    earlier output of `command`, and symlinks; the same layout for each command."""
    from mora_train.analysis.spectrum import LayerSpectrum, save_spectra

    source = root / "source"
    (source / "sub").mkdir(parents=True)
    (source / "requests.jsonl").write_text('{"adapter": null, "prompt": "hi"}\n')
    foreign = root / "foreign"
    foreign.mkdir()
    for name in ("report.md", "spectrum.png", "adapter_config.json", "notes.txt"):
        (foreign / name).write_text("the user's")
    (root / "empty").mkdir()
    (root / "plain.txt").write_text("the user's")
    (root / "link").symlink_to(source)
    (root / "foreign-link").symlink_to(foreign)
    ours = root / ("ours.jsonl" if command == "generate" else "ours")
    if command == "generate":
        ours.write_text('{"adapter": null, "prompt": "p", "completion": "c"}\n')
    else:
        ours.mkdir()
    if command == "export":
        (ours / "export_report.json").write_text("{}")
        (ours / "adapter_config.json").write_text("{}")
    if command == "report":
        from mora_train.analysis.report_tables import CSV_COLUMNS

        (ours / "report.csv").write_text(",".join(CSV_COLUMNS) + "\n")
        (ours / "report.md").write_text("# Sweep report\n")
    if command == "spectrum":
        import torch

        save_spectra(
            [LayerSpectrum("model.layers.0.q_proj", 4, 4, torch.ones(2))], ours / "spectrum.safetensors", "adapter"
        )
    if command == "report":  # a sweep whose one run keeps its adapter/ in the source folder
        run = root / "sweep" / "0_run"
        run.mkdir(parents=True)
        (run / "error.json").write_text(json.dumps({"error_type": "ConfigError", "message": "x"}))
        (run / "adapter").symlink_to(source)
    return {"source": source, "ours": ours}


def _target(root: Path, kind: str, name: str) -> str:
    return {
        "blank": "",
        "spaces": " \t ",
        "new": str(root / "new" / "out"),
        "empty": str(root / "empty"),
        "file": str(root / "plain.txt"),
        "foreign": str(root / "foreign"),
        "source": str(root / "source"),
        "inside": str(root / "source" / "sub"),
        "source_file": str(root / "source" / "requests.jsonl"),
        "root": str(root),
        "link_to_source": str(root / "link"),
        "inside_link": str(root / "link" / "new"),
        "under_file": str(root / "plain.txt" / "out"),
        "foreign_link": str(root / "foreign-link"),
        "dev_null": "/dev/null",
        "ours": str(root / ("ours.jsonl" if "generate" in name else "ours")),
        "random": str(root / name.split("|", 1)[1]) if "|" in name else str(root / "x"),
    }[kind]


def _check_command(command: str, root: Path, target: str, source: Path) -> None:
    """The command's own check, reached the way the command reaches it; MoraTrainError when refused."""
    if command == "export":
        from mora_train.pipeline.lora_export import export_run

        export_run(source, target)  # an acceptable target gets as far as "not a run dir": nothing loads
    elif command == "generate":
        from mora_train.pipeline.generate import run_generate

        run_generate(
            "tiny-llama", {"a": source}, source / "requests.jsonl", target
        )  # then: "not a PEFT adapter folder"
    elif command == "report":
        from mora_train.analysis.report import check_report_target
        from mora_train.analysis.runs import find_runs

        check_report_target(target, root / "sweep", find_runs(root / "sweep"))
    else:
        from mora_train.analysis.spectrum import check_spectrum_target

        check_spectrum_target(target, source, False, None)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_output_targets(budget: int, tmp_path: Path) -> None:
    def check(example: tuple[str, str]) -> None:
        kind, random_name = example
        for command in COMMANDS:
            check_one(command, kind, random_name)

    def check_one(command: str, kind: str, random_name: str) -> None:
        root = tmp_path / "area"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        places = _output_area(root, command)
        target = _target(root, kind, f"{command}|{random_name}" if kind == "random" else command)
        before = _tree(root)
        try:
            _check_command(command, root, target, places["source"])
            refused = None
        except MoraTrainError as err:
            refused = str(err)
        assert _tree(root) == before, f"{command} {kind}: files changed"
        option = {"export": "OUT_DIR", "generate": "--output", "report": "--out", "spectrum": "--out"}[command]
        target_refused = refused is not None and refused.startswith(option)
        if kind in REFUSED_BY_ALL:
            assert target_refused, f"{command} accepted {kind} target {target!r}: {refused}"
            assert (
                target in refused
                or repr(target) in refused
                or repr(target.replace("\0", "")) in refused
                or not target.strip()
            ), refused
        if kind in ACCEPTED_BY_ALL and not (kind == "empty" and command == "generate"):
            assert not target_refused, f"{command} refused {kind} target {target!r}: {refused}"
        if kind == "empty" and command == "generate":  # a folder where a file is written
            assert target_refused and "is a folder" in refused, refused
        if kind == "root":  # it holds the source: replaced whole (export) or not a file (generate) -> refused
            assert target_refused == (command in ("export", "generate")), refused

    names = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=300)
    fuzz("output targets", budget, st.tuples(st.sampled_from(TARGETS), names), check)


# -- concurrent writers ------------------------------------------------------------------------------------
# Another live process takes and drops run-dir locks (or is killed) at random; this process's writers and
# readers must be refused exactly while that process holds the run dir, naming its PID, and accepted otherwise.

ACTIONS = st.lists(
    st.tuples(st.sampled_from(["hold", "drop", "write", "read", "kill"]), st.sampled_from([0, 1])),
    min_size=1,
    max_size=8,
)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzz_concurrent_writers(budget: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mora_train.core import run_lock
    from mora_train.core.run_lock import RunDirLock, refuse_if_being_written
    from tests.support.lock_holder import LockHolder

    monkeypatch.setattr(run_lock, "RETRY_S", 0.02)  # a refused writer retries this long first: keep examples fast
    holders = [LockHolder()]
    dirs = [tmp_path / "run0", tmp_path / "sweep" / "run1"]

    def check(actions: list[tuple[str, int]]) -> None:
        held: set[int] = set()
        try:
            play(actions, held)
        finally:  # the next example starts with nothing held, even after a failed one (hypothesis shrinks)
            for which in sorted(held):
                holders[-1].unlock(dirs[which])

    def play(actions: list[tuple[str, int]], held: set[int]) -> None:
        for action, which in actions:
            run_dir, holder = dirs[which], holders[-1]
            if action == "hold" and which not in held:
                holder.lock(run_dir)
                held.add(which)
            elif action == "drop" and which in held:
                holder.unlock(run_dir)
                held.discard(which)
            elif action == "kill":
                holder.kill()
                holders.append(LockHolder())
                held.clear()
            elif action in ("write", "read"):
                try:
                    if action == "write":
                        RunDirLock(run_dir).acquire().release()
                    else:
                        refuse_if_being_written(run_dir / "checkpoints" / "checkpoint-2", "checkpoint=", "a reader")
                    refused = None
                except MoraTrainError as err:
                    refused = str(err)
                assert (refused is not None) == (which in held), (actions, refused)
                if refused:
                    assert f"PID {holder.pid}" in refused and str(run_dir) in refused, refused

    try:
        fuzz("concurrent writers", budget, ACTIONS, check)
    finally:
        for holder in holders:
            holder.kill()

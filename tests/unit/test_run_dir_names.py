"""The names of a run dir's files live only in mora_train.core.run_dir.RunDir: a reader and a writer that spelled
one each cannot disagree on it. Everything else takes the name or the path from RunDir."""

from __future__ import annotations

import ast
from pathlib import Path

import mora_train
from mora_train.core.run_dir import RunDir

PACKAGE = Path(mora_train.__file__).parent
HOME = PACKAGE / "core" / "run_dir.py"
# The same plain word naming a folder that is not a run dir's: the shipped lm-eval task configs, and the export
# folder's evaluation of the adapted model (evaluation/adapter beside evaluation/exported_lora).
NOT_A_RUN_DIR = {("evaluation/lm_harness.py", "lm_eval"), ("pipeline/lora_export.py", "adapter")}


def _joined_to_a_path(node: ast.Constant, parents: dict[ast.AST, ast.AST]) -> bool:
    """A plain word used as a path part: `x / "adapter"`, or inside a tuple of names that is iterated or joined."""
    parent = parents.get(node)
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div):
        return True
    return isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), (ast.For, ast.comprehension))


def _checkpoint_fstring(node: ast.JoinedStr) -> bool:
    first = node.values[0] if node.values else None
    return isinstance(first, ast.Constant) and str(first.value).endswith(RunDir.CHECKPOINT_PREFIX)


def offenders(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        if isinstance(node, ast.JoinedStr) and _checkpoint_fstring(node):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: f-string checkpoint-N")
        if not isinstance(node, ast.Constant) or node.value not in RunDir.NAMES:
            continue
        if node.value in RunDir.PLAIN_WORDS and not _joined_to_a_path(node, parents):
            continue  # the same word as a config key or metric name
        if (path.relative_to(PACKAGE).as_posix(), node.value) in NOT_A_RUN_DIR:
            continue
        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_run_dir_names_only_in_run_dir():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != HOME for hit in offenders(path)]
    assert not found, "run-dir names outside mora_train/core/run_dir.py (use RunDir):\n" + "\n".join(found)


def test_the_scan_sees_a_literal(tmp_path):
    sample = PACKAGE / "core" / "_scan_sample_for_test.py"
    sample.write_text(
        'from pathlib import Path\nA = Path("r") / "merged"\nB = Path("r") / "adapter"\nC = {"adapter": 1}\n'
        'D = f"checkpoint-{3}"\n'
    )
    try:
        hits = offenders(sample)
    finally:
        sample.unlink()
    assert [hit.split(": ", 1)[1] for hit in hits] == ["'merged'", "'adapter'", "f-string checkpoint-N"]


def test_paths():
    run = RunDir("/r")
    assert run.merged == Path("/r/merged") and run.metrics == Path("/r/metrics.json")
    assert run.checkpoint(7) == Path("/r/checkpoints/checkpoint-7")
    assert run.resolved_config == Path("/r/resolved_config.yaml") and run.hydra_config == Path("/r/.hydra/config.yaml")
    assert run.lm_eval_samples("gsm8k") == Path("/r/lm_eval/samples_gsm8k.jsonl")
    assert len(set(RunDir.NAMES)) == len(RunDir.NAMES)

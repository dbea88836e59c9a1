"""Print, write or check docs/config-reference.md, the reference of every config key.

    python scripts/config_reference.py            # print it
    python scripts/config_reference.py --write    # write docs/config-reference.md
    python scripts/config_reference.py --check    # exit 1 with a diff when the file is stale

The reference is rendered from the typed sections (mora_train/config/reference.py); this script supplies what
config/ may not import: the root `RunConfig` and the section classes that `adapter.name` and `task.name` pick.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from mora_train.adapters import ADAPTER_TYPES
from mora_train.config.reference import render_reference
from mora_train.config.schema import Section
from mora_train.pipeline.run_config import RunConfig
from mora_train.tasks import TASKS

DOC = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

NOTES = {
    "trainer.hf": (
        "**`trainer.hf.*`**: any field of transformers' [`TrainingArguments`]("
        "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments) "
        "goes under `trainer.hf`, added with `+` since the YAML does not hold it: `+trainer.hf.neftune_noise_alpha=5 "
        "+trainer.hf.torch_compile=true`. The names and values are checked against TrainingArguments itself before "
        "the model loads; the keys above are set through their own names, not through `trainer.hf`."
    ),
}


def variants() -> dict[str, dict[str, type[Section]]]:
    """The section class of each `adapter=` and `task=` choice (a task without its settings class is left out)."""
    tasks = {name: getattr(task, "settings", None) for name, task in TASKS.items()}
    typed = {name: cls for name, cls in tasks.items() if isinstance(cls, type) and issubclass(cls, Section)}
    if typed and len(typed) < len(tasks):
        print(
            f"config_reference: no settings class for task={', '.join(sorted(set(tasks) - set(typed)))}; "
            "left out of the reference",
            file=sys.stderr,
        )
    return {"adapter": {name: adapter.settings_type for name, adapter in ADAPTER_TYPES.items()}, "task": typed}


def config_reference() -> str:
    """The reference as it should be committed."""
    return render_reference(RunConfig, {key: found for key, found in variants().items() if found}, NOTES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(DOC.parents[1])}")
    action.add_argument("--check", action="store_true", help="exit 1 with a diff when the file is stale")
    args = parser.parse_args(argv)
    fresh = config_reference()
    if args.write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(fresh, encoding="utf-8")
        print(f"wrote {DOC}")
        return 0
    if args.check:
        committed = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if committed == fresh:
            return 0
        diff = difflib.unified_diff(
            committed.splitlines(keepends=True),
            fresh.splitlines(keepends=True),
            "docs/config-reference.md (committed)",
            "docs/config-reference.md (fresh)",
        )
        sys.stdout.writelines(diff)
        print("\ndocs/config-reference.md is stale: run `python scripts/config_reference.py --write`")
        return 1
    sys.stdout.write(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())

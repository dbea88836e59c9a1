"""Which checkpoint a run resumes from (decided, and refused, before anything in the run dir changes), carried out.

`decide_resume` reads the run dir and the trainer.resume setting and returns a ResumePlan, or raises; the main
process then carries it out (`apply_resume_plan`): leftovers removed, corrupt checkpoints moved aside, a replaced
finished run's outputs or discarded checkpoints removed. The checkpoints themselves (complete or absent, verified
by their checksums) are mora_train.training.checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mora_train.config.overrides import paste_command, shell_override
from mora_train.core.errors import MoraTrainError
from mora_train.core.run_dir import RunDir
from mora_train.training.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_folders,
    checkpoint_step,
    complete_checkpoints,
    is_complete,
    move_aside,
    remove_leftovers,
    remove_run_dir_leftovers,
    remove_via_trash,
    verify,
)

log = logging.getLogger(__name__)


def _describe(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _describe_identity(identity: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in identity.items())


def _check_matches(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse a checkpoint written by another method or rank (compared as Adapter.identity records them)."""
    info = _describe(checkpoint)
    saved = {key: info.get(key) for key in identity}
    if info.get("adapter") and saved != identity:
        written = {key: info[key] for key in info if key in identity or key == "adapter"}
        raise MoraTrainError(
            f"checkpoint {checkpoint} was written by {_describe_identity(written)}, but this run is "
            f"{_describe_identity(identity)}; resume with the settings it was trained with, or start over with "
            "trainer.resume=false overwrite=true (or another output_dir)"
        )


def is_main_process() -> bool:
    """Only the first process of a multi-process run deletes anything (all of them read)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class ResumePlan:
    """What a start will do in its run dir, decided (and refused) before anything there is changed."""

    run_dir: Path
    start: Path | None = None  # the checkpoint to continue from; None: from scratch
    discard: list[Path] = field(default_factory=list)  # old checkpoints deleted when starting over
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # moved aside, with what was wrong
    replace_finished: bool = False  # overwrite=true over a finished run: its outputs are removed


def _newest_intact(candidates: list[Path], everyone: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the corrupt ones met on the way (with what was wrong).

    Checksums are computed newest first until one checkpoint verifies. With everyone=True every candidate
    also gets the cheap look (marker, files, sizes: no content read), so that a truncated, emptied or
    unmarked checkpoint-N older than the one resumed from is found too, and kept aside rather than later
    deleted by rotation."""
    corrupt = []
    if everyone:
        corrupt = [(c, why) for c in reversed(candidates) if (why := verify(c, checksums=False)) is not None]
        candidates = [c for c in candidates if c not in {path for path, _ in corrupt}]
    for checkpoint in reversed(candidates):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint, corrupt
        corrupt.append((checkpoint, problem))
    return None, corrupt


def _all_corrupt_error(where: Path, corrupt: list[tuple[Path, str]]) -> MoraTrainError:
    listing = "; ".join(f"{p.name}: {why}" for p, why in corrupt)
    return MoraTrainError(
        f"no intact checkpoint to resume from in {where}: {listing}. Nothing was deleted. Restore the files, "
        "or start over with trainer.resume=false overwrite=true (the corrupt checkpoints are then deleted too)"
    )


def decide_resume(run_dir: Path, resume: Any, overwrite: bool, identity: dict[str, Any]) -> ResumePlan:
    """Which checkpoint this run continues from, and what that requires; raises before changing anything.

    resume: "auto" (newest intact checkpoint under run_dir/checkpoints, if any), True (the same,
    but one must exist), False (start over), or a path to a checkpoint folder or a run folder.
    Starting over in a run dir that holds checkpoints needs overwrite=true, so a typo never deletes progress.
    `identity` (adapters.adapter_identity) is what the checkpoint must have been written by.
    """
    run_dir = Path(run_dir)
    checkpoints_dir = RunDir(run_dir).checkpoints
    found = checkpoint_folders(checkpoints_dir)  # a checkpoint-N was published complete: if it is not, it is corrupt
    existing = [p for p in found if is_complete(p)]
    finished = RunDir(run_dir).metrics.exists()
    plan = ResumePlan(run_dir, replace_finished=finished)

    if isinstance(resume, str) and resume != "auto":
        plan.start = _given_checkpoint(resume)
        _check_matches(plan.start, identity)
    elif resume is False or finished:  # start over
        _check_start_over(run_dir, resume, overwrite, existing)
        plan.discard = found
    elif found:
        if existing:
            _check_matches(existing[-1], identity)
        plan.start, plan.corrupt = _newest_intact(found, everyone=True)
        if plan.start is None:
            raise _all_corrupt_error(checkpoints_dir, plan.corrupt)
        _check_matches(plan.start, identity)
    elif resume is True:
        raise MoraTrainError(
            f"trainer.resume=true but {checkpoints_dir} holds no complete checkpoint; "
            "use trainer.resume=auto to start from scratch when there is none"
        )
    return plan


def _given_checkpoint(resume: str) -> Path:
    """trainer.resume=PATH: the checkpoint folder it names, or the newest intact checkpoint of the run dir it names."""
    given = Path(resume).expanduser()
    if checkpoint_step(given) is None and (RunDir(given).checkpoints).is_dir():
        candidates = complete_checkpoints(RunDir(given).checkpoints)
        if not candidates:
            raise MoraTrainError(
                f"trainer.resume={resume}: {RunDir(given).checkpoints} holds no complete checkpoint; give a "
                "RUN_DIR/checkpoints/checkpoint-N folder, a run dir with checkpoints, or trainer.resume=auto"
            )
        start, corrupt = _newest_intact(candidates)
        if start is None:
            raise _all_corrupt_error(RunDir(given).checkpoints, corrupt)
        for path, why in corrupt:  # another run dir's files: reported, not moved
            log.warning("skipping corrupt checkpoint %s: %s", path, why)
        return start
    if not is_complete(given):
        raise MoraTrainError(
            f"trainer.resume={resume}: {given} is not a complete checkpoint (no {COMPLETE_MARKER}, or a file "
            "it lists is missing or truncated); give a RUN_DIR/checkpoints/checkpoint-N folder, a run dir, "
            "or trainer.resume=auto"
        )
    problem = verify(given)
    if problem is not None:
        raise MoraTrainError(
            f"trainer.resume={resume}: checkpoint {given} is corrupt: {problem}. Give an older checkpoint "
            "(trainer.resume=PATH/checkpoint-N) or its run dir, which falls back to the newest intact one"
        )
    return given


def _check_start_over(run_dir: Path, resume: Any, overwrite: bool, existing: list[Path]) -> None:
    """Starting over (trainer.resume=false, or over a finished run): refused where it would lose what it should not."""
    if resume is True:
        raise MoraTrainError(
            f"trainer.resume=true, but {run_dir} holds a finished run, which overwrite=true replaces; "
            "use trainer.resume=auto, or trainer.resume=PATH to continue from one of its checkpoints"
        )
    if existing and not overwrite:
        raise MoraTrainError(
            f"{RunDir(run_dir).checkpoints} holds checkpoints of an unfinished run (newest: step "
            f"{checkpoint_step(existing[-1])}) and trainer.resume=false would discard them; pass overwrite=true "
            "as well to start over, or drop trainer.resume=false to continue from the newest"
        )


def apply_resume_plan(plan: ResumePlan) -> Path | None:
    """Carry out a decided plan (main process only deletes or moves): clean leftovers, move corrupt
    checkpoints aside, remove a replaced finished run's outputs or discarded checkpoints. Returns plan.start."""
    run_dir = plan.run_dir
    checkpoints_dir = RunDir(run_dir).checkpoints
    if not is_main_process():
        return plan.start
    remove_run_dir_leftovers(run_dir)
    remove_leftovers(checkpoints_dir)
    for path, why in plan.corrupt:
        aside = move_aside(path)
        log.warning(
            "checkpoint %s is corrupt: %s; moved it aside to %s (kept for inspection) and resuming from %s",
            path,
            why,
            aside,
            plan.start,
        )
    if plan.replace_finished and RunDir(run_dir).metrics.exists():
        # metrics.json goes first: until the new run writes its own, the dir no longer looks finished.
        log.warning("overwrite=true: replacing the finished run in %s", run_dir)
        RunDir(run_dir).metrics.unlink()
        RunDir(run_dir).card_facts.unlink(missing_ok=True)  # it describes the outputs removed below
        for name in RunDir.FINISHED_OUTPUTS:
            if (run_dir / name).exists():
                remove_via_trash(run_dir / name)
    if plan.discard:
        log.warning("starting over: deleting the old checkpoints in %s (overwrite=true)", checkpoints_dir)
        for old in plan.discard:
            if old.exists():
                remove_via_trash(old)
    return plan.start


def plan_resume(run_dir: Path, resume: Any, overwrite: bool, identity: dict[str, Any]) -> Path | None:
    """decide_resume, then apply_resume_plan: the checkpoint to continue from (None: from scratch).

    A finished run dir (metrics.json) only gets here with overwrite=true: its outputs are removed first.
    """
    return apply_resume_plan(decide_resume(run_dir, resume, overwrite, identity))


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run (Hydra's overrides, with output_dir pinned), paste-able as printed."""
    output_dir = str(Path(run_dir).resolve())
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not running under Hydra (e.g. pipeline.run called from Python)
        return (
            f"run it again with {shell_override('output_dir', output_dir)} (trainer.resume=auto, the default, "
            "picks up the newest checkpoint)"
        )
    return paste_command(overrides, "output_dir", output_dir, dropped=("trainer.resume", "overwrite"))

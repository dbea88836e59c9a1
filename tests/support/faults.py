"""Fault injection for the resilience tests. Test code only: nothing in mora_train reads it.

A fault is `<fault>@<point>=<n>`:

| fault     | @step=n (when optimizer step n begins)      | @save=n (checkpoint n written, not yet published) |
|-----------|---------------------------------------------|---------------------------------------------------|
| `sigkill` | the process SIGKILLs itself                 | the process SIGKILLs itself mid-save             |
| `sigint`, `sigterm` | the process sends itself the signal | the process sends itself the signal              |
| `nan`     | step n's loss becomes NaN (poisons its grads) | —                                               |
| `enospc`  | —                                           | the save fails with OSError(ENOSPC)               |
| `fill`    | the disk holding the run dir is filled up (a real disk-full on the next write) | — |

In-process tests: `inject(monkeypatch, "nan@step=3")` patches the trainer classes for that test.
Subprocesses (`mora-train` run by a test): `fault_env("sigkill@step=3")` is the environment that makes
the interpreter load plugin/sitecustomize.py, which installs the same patches from MORA_TEST_FAULT.
Each installed fault fires once (per process, per install).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "MORA_TEST_FAULT"  # read by tests/support/plugin/sitecustomize.py only
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin"
REPO = Path(__file__).resolve().parents[2]
FAULTS = ("sigkill", "sigint", "sigterm", "nan", "enospc", "fill")
POINTS = ("step", "save")
FILLER_NAME = ".mora-train-fault-filler"


def parse(spec: str) -> tuple[str, str, int]:
    """'sigkill@step=3' -> ('sigkill', 'step', 3); ValueError naming the accepted forms otherwise."""
    try:
        fault, rest = spec.split("@", 1)
        point, number = rest.split("=", 1)
        parsed = (fault.strip(), point.strip(), int(number))
    except ValueError:
        parsed = ("", "", 0)
    if parsed[0] not in FAULTS or parsed[1] not in POINTS or parsed[2] < 1:
        raise ValueError(f"fault {spec!r}: use <fault>@<point>=<n>, fault in {FAULTS}, point in {POINTS}, n >= 1")
    return parsed


def fault_env(spec: str) -> dict[str, str]:
    """Environment for a subprocess that should run with this fault (loads the plugin via PYTHONPATH)."""
    parse(spec)
    path = os.pathsep.join(p for p in (str(PLUGIN_DIR), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {ENV_VAR: spec, "PYTHONPATH": path}


def _signal_self(fault: str) -> None:
    sig = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[fault]
    os.kill(os.getpid(), sig)


def fill_disk(run_dir: Path) -> None:
    """Write zeros into run_dir until the filesystem is full (for tests on a small tmpfs only)."""
    chunk = b"\0" * (1 << 16)
    with open(Path(run_dir) / FILLER_NAME, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(chunk)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise


def install(spec: str, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Patch mora_train's trainer so the fault fires; `patch` is setattr or monkeypatch.setattr."""
    import transformers
    from transformers import TrainerCallback

    from mora_train.training.adapter_trainer import AdapterTrainer

    fault, point, number = parse(spec)
    fired: list[bool] = []

    def armed(at_point: str, step: int) -> bool:
        if fired or at_point != point or step != number:
            return False
        fired.append(True)
        return True

    cls = AdapterTrainer
    if point == "step" and fault != "nan":

        class StepFault(TrainerCallback):
            def __init__(self, run_dir: Path) -> None:
                self.run_dir = run_dir

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if armed("step", state.global_step + 1):
                    fill_disk(self.run_dir) if fault == "fill" else _signal_self(fault)

        original_init = cls.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            self.add_callback(StepFault(Path(self.args.output_dir).parent))  # output_dir is RUN_DIR/checkpoints

        patch(cls, "__init__", init)
    elif fault == "nan":
        original_loss = transformers.Trainer.compute_loss

        def compute_loss(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original_loss(self, *args, **kwargs)
            if armed("step", self.state.global_step + 1):
                nan = float("nan")
                result = (result[0] * nan, *result[1:]) if isinstance(result, tuple) else result * nan
            return result

        patch(cls, "compute_loss", compute_loss)
    else:  # @save: after the stock checkpoint files are staged, before AdapterTrainer publishes them
        original_save = transformers.Trainer._save_checkpoint

        def save_checkpoint(self: Any, model: Any, trial: Any) -> None:
            original_save(self, model, trial)
            step = self.state.global_step
            if self.args.should_save and armed("save", step):
                staged = Path(self._staging_root) / f"checkpoint-{step}"
                if fault == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staged / "optimizer.pt"))
                _signal_self(fault)

        patch(transformers.Trainer, "_save_checkpoint", save_checkpoint)


def inject(monkeypatch: Any, spec: str) -> None:
    """In-process: install the fault for the current test (undone by monkeypatch at its end)."""
    install(spec, monkeypatch.setattr)

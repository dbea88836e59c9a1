"""The layout of a run directory: every file and folder name a run writes, and the paths they make.

A run dir is written by `mora-train` (mode=train and mode=eval) and read by the report, the spectrum, the export,
resumes and sweeps. The names live only here (a test scans the package for them elsewhere), so that a reader and a
writer cannot disagree on one. A module that needs a bare name, e.g. to match it inside a folder, takes it from
RunDir: `RunDir.METRICS`; one that has the folder takes the path: `RunDir(path).metrics`.
"""

from __future__ import annotations

import os
from pathlib import Path


class RunDir:
    """The paths of one run dir. Nothing is read or created: these are names, the callers decide what exists."""

    RESOLVED_CONFIG = "resolved_config.yaml"  # the config it ran with, interpolations resolved
    HYDRA = ".hydra"  # Hydra's records: config.yaml, hydra.yaml, overrides.yaml
    HYDRA_CONFIG = "config.yaml"
    HYDRA_HYDRA = "hydra.yaml"
    HYDRA_OVERRIDES = "overrides.yaml"
    TRAIN_LOG = "train.log"
    LOCK = ".mora-train.lock"  # held by the process writing the run dir (core.run_lock)
    ADAPTER = "adapter"  # the trained adapter, reloadable on the base model
    MERGED = "merged"  # the adapter merged into the base: a plain transformers checkpoint
    MERGED_UNVERIFIED = "merged-unverified"  # a merged/ that failed the merge check, kept for inspection
    CHECKPOINTS = "checkpoints"  # training checkpoints, one checkpoint-N folder per saved step
    CHECKPOINT_PREFIX = "checkpoint-"
    METRICS = "metrics.json"  # written last: its presence marks a finished run
    CHECKSUMS = "checksums.json"  # sha256 of every file of adapter/ and merged/, checked by mode=eval
    MODEL_CARD = "README.md"  # the model card in adapter/ and merged/ (and in the folders exports write)
    CARD_FACTS = "card_facts.json"  # what the run's model cards say, for the cards of its later exports
    ERROR_JSON = "error.json"  # a failed sweep job: what went wrong, for the report
    ERROR_TXT = "error.txt"  # the same for a reader, with the traceback
    TRACEBACK = "traceback.txt"  # an unexpected error's traceback (the one-line message names it)
    LOG_HISTORY = "log_history.json"  # the Trainer's logged steps, for the loss curves
    LOSS_PLOT = "loss.png"
    PREDICTIONS = "predictions.jsonl"  # per-example predictions of the math and uuid tasks
    BENCHMARK_PREDICTIONS = "benchmark_predictions.jsonl"  # per-example scores of the multiple-choice benchmarks
    SAMPLES = "samples.jsonl"  # generated answers of the instruction task
    TENSORBOARD = "tensorboard"
    LM_EVAL = "lm_eval"  # lm-eval-harness results and samples
    LM_EVAL_RESULTS = "results.json"
    LM_EVAL_SAMPLES_PREFIX = "samples_"  # lm_eval/samples_TASK.jsonl

    # What a run produced and no other command may write into (the report and the spectrum refuse it).
    OUTPUTS = (ADAPTER, MERGED, MERGED_UNVERIFIED, CHECKPOINTS)
    # What a finished run leaves and a replacing run (overwrite=true) removes before it trains again.
    FINISHED_OUTPUTS = (ADAPTER, MERGED)
    # Folders whose files checksums.json records.
    CHECKSUMMED = (ADAPTER, MERGED)
    # Every name above, for the test that keeps them out of the rest of the package. The plain words among them
    # (adapter, lm_eval, tensorboard) are also config keys and metric names, so that test flags those only where
    # they are joined to a path.
    NAMES = (
        RESOLVED_CONFIG,
        HYDRA,
        TRAIN_LOG,
        LOCK,
        ADAPTER,
        MERGED,
        MERGED_UNVERIFIED,
        CHECKPOINTS,
        METRICS,
        CHECKSUMS,
        MODEL_CARD,
        CARD_FACTS,
        ERROR_JSON,
        ERROR_TXT,
        TRACEBACK,
        LOG_HISTORY,
        LOSS_PLOT,
        PREDICTIONS,
        BENCHMARK_PREDICTIONS,
        SAMPLES,
        TENSORBOARD,
        LM_EVAL,
    )
    PLAIN_WORDS = (ADAPTER, LM_EVAL, TENSORBOARD)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def resolved_config(self) -> Path:
        return self.path / self.RESOLVED_CONFIG

    @property
    def hydra(self) -> Path:
        return self.path / self.HYDRA

    @property
    def hydra_config(self) -> Path:
        return self.hydra / self.HYDRA_CONFIG

    @property
    def hydra_overrides(self) -> Path:
        return self.hydra / self.HYDRA_OVERRIDES

    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def merged(self) -> Path:
        return self.path / self.MERGED

    @property
    def merged_unverified(self) -> Path:
        return self.path / self.MERGED_UNVERIFIED

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        """checkpoints/checkpoint-STEP."""
        return self.checkpoints / self.checkpoint_name(step)

    @classmethod
    def checkpoint_name(cls, step: int) -> str:
        """The folder name of the checkpoint of `step`, wherever it is staged."""
        return f"{cls.CHECKPOINT_PREFIX}{step}"

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def checksums(self) -> Path:
        return self.path / self.CHECKSUMS

    @property
    def card_facts(self) -> Path:
        return self.path / self.CARD_FACTS

    @property
    def error_json(self) -> Path:
        return self.path / self.ERROR_JSON

    @property
    def error_txt(self) -> Path:
        return self.path / self.ERROR_TXT

    @property
    def traceback(self) -> Path:
        return self.path / self.TRACEBACK

    @property
    def log_history(self) -> Path:
        return self.path / self.LOG_HISTORY

    @property
    def loss_plot(self) -> Path:
        return self.path / self.LOSS_PLOT

    @property
    def predictions(self) -> Path:
        return self.path / self.PREDICTIONS

    @property
    def benchmark_predictions(self) -> Path:
        return self.path / self.BENCHMARK_PREDICTIONS

    @property
    def samples(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def lm_eval(self) -> Path:
        return self.path / self.LM_EVAL

    def lm_eval_samples(self, task: str) -> Path:
        """lm_eval/samples_TASK.jsonl."""
        return self.lm_eval / f"{self.LM_EVAL_SAMPLES_PREFIX}{task}.jsonl"

    @property
    def lm_eval_results(self) -> Path:
        return self.lm_eval / self.LM_EVAL_RESULTS

    @property
    def outputs(self) -> list[Path]:
        """The folders a run produced (OUTPUTS), existing or not."""
        return [self.path / name for name in self.OUTPUTS]

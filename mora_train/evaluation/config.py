"""Typed settings of evaluation: the root `eval` section (which backend scores a model, and lm-evaluation-harness's
settings) and the `task.eval` sections the tasks' own evaluators read.

Each task's section class (tasks/, data/) holds one of the `task.eval` classes below as its `eval` field. The
checks here are each field's own (positive integers, non-empty stop strings); what needs more than the section
(the lm-eval task names and data files, task.eval.benchmarks against task.benchmarks) is checked by its owner:
`lm_harness.config_problems` and the data layer.
"""

from __future__ import annotations

from mora_train.config.schema import Section, setting

BACKENDS = ("task", "lm_eval", "both")


def _positive(prefix: str, key: str, value: int | None, nullable: bool = False) -> list[str]:
    """`key` must be at least 1 (or null where null means all)."""
    if value is None and nullable:
        return []
    if value is None or value < 1:
        return [f"`{prefix}.{key}={value}` must be a positive integer{' or null (all)' if nullable else ''}"]
    return []


# -- the root `eval` section ---------------------------------------------------------------------------------


class LmEvalConfig(Section):
    """eval.lm_eval: lm-evaluation-harness on lm-eval task files (configs/lm_eval/ and include_path)."""

    tasks: list[str] | None = setting(
        default=None,
        help="lm-eval task, group or tag names of configs/lm_eval/ and include_path, e.g. [gsm8k,pubmedqa]",
    )
    num_fewshot: int | None = setting(
        default=None, help="few-shot examples per prompt; null: each task's own (gsm8k: 5)"
    )
    limit: int | float | None = setting(
        default=None, help="the first N documents of each task (a float in (0, 1]: that share); null: all"
    )
    batch_size: int | str = setting(default=8, help="batch size, or auto (lm-eval finds the largest that fits)")
    max_gen_toks: int | None = setting(
        default=None, help="generation cap of generate_until tasks; null: the task's own, else 256"
    )
    data_dir: str | None = setting(
        default=None, help="where the task files' relative data_files are (default: data_dir, MORA_TRAIN_DATA)"
    )
    include_path: list[str] | None = setting(
        factory=list, help="folders of your own lm-eval task YAML files (their data_files relative to data_dir too)"
    )
    log_samples: bool = setting(
        default=True, help="write RUN_DIR/lm_eval/samples_TASK.jsonl: prompt, response, extracted answer, target"
    )

    def check(self, prefix: str) -> list[str]:
        problems = []
        if self.num_fewshot is not None and self.num_fewshot < 0:
            problems.append(
                f"`{prefix}.num_fewshot={self.num_fewshot}` must be 0 or more (null: each task's own default)"
            )
        limit = self.limit
        if isinstance(limit, float) and not 0 < limit <= 1:
            problems.append(
                f"`{prefix}.limit={limit}` must be a whole number of documents per task or a share in (0, 1]"
            )
        elif isinstance(limit, int) and limit < 1:
            problems.append(f"`{prefix}.limit={limit}` must be at least 1 (null: every document)")
        batch = self.batch_size
        if isinstance(batch, str) and not (batch == "auto" or batch.startswith("auto:")):
            problems.append(
                f"`{prefix}.batch_size={batch}` must be a positive integer or auto (lm-eval finds the "
                "largest that fits)"
            )
        elif isinstance(batch, int) and batch < 1:
            problems.append(f"`{prefix}.batch_size={batch}` must be at least 1")
        if self.max_gen_toks is not None and self.max_gen_toks < 1:
            problems.append(
                f"`{prefix}.max_gen_toks={self.max_gen_toks}` must be at least 1 (null: the task's own, else 256)"
            )
        return problems


class EvalConfig(Section):
    """eval: what scores a model, after training and in mode=eval alike."""

    # A str checked below rather than a Literal: the message says what each backend does.
    backend: str = setting(
        default="task",
        help="task: the task's own evaluation (task.eval.*); lm_eval: lm-evaluation-harness on "
        "eval.lm_eval.tasks; both",
    )
    lm_eval: LmEvalConfig = setting(
        factory=LmEvalConfig, help="lm-evaluation-harness settings (read with eval.backend=lm_eval or both)"
    )

    def check(self, prefix: str) -> list[str]:
        if self.backend not in BACKENDS:
            return [
                (
                    f"`{prefix}.backend={self.backend}` is unknown; use task (the task's own evaluation, task.eval.*), "
                    "lm_eval (lm-evaluation-harness on eval.lm_eval.tasks) or both"
                )
            ]
        return []

    @property
    def runs_task(self) -> bool:
        """Whether the task's own evaluation runs (so its evaluation data must be built)."""
        return self.backend in ("task", "both")

    @property
    def runs_lm_eval(self) -> bool:
        """Whether lm-evaluation-harness runs."""
        return self.backend in ("lm_eval", "both")


# -- the `task.eval` sections ----------------------------------------------------------------------------------


class TaskEvalSettings(Section):
    """task.eval: what every task's own evaluation reads."""

    max_samples: int | None = setting(default=None, help="evaluate on the first N examples only (null: all)")
    batch_size: int = setting(default=16, help="examples per evaluation batch")

    def check(self, prefix: str) -> list[str]:
        return [
            *_positive(prefix, "max_samples", self.max_samples, nullable=True),
            *_positive(prefix, "batch_size", self.batch_size),
        ]


class UuidEvalSettings(TaskEvalSettings):
    """task.eval of task=uuid: greedy generation of each key's value."""


class GenerationEvalSettings(TaskEvalSettings):
    """task.eval of task=gsm8k / metamath: greedy generation, final-answer extraction, exact match."""

    max_new_tokens: int = setting(default=256, help="generation cap per problem, in tokens")
    stop: list[str] = setting(
        factory=lambda: ["\n\n\n"],
        help="generation stops at, and the answer is read before, the first of these (may be empty: [])",
    )

    def check(self, prefix: str) -> list[str]:
        problems = [*super().check(prefix), *_positive(prefix, "max_new_tokens", self.max_new_tokens)]
        if not all(self.stop):
            problems.append(f"`{prefix}.stop={self.stop!r}` must be a list of non-empty strings (may be empty: [])")
        return problems


class InstructionEvalSettings(TaskEvalSettings):
    """task.eval of task=instruction: held-out loss, plus a few generated answers (RUN_DIR/samples.jsonl)."""

    batch_size: int = setting(default=4, help="examples per evaluation batch")
    num_generations: int = setting(
        default=5, help="generated answers written to samples.jsonl for the first N conversations"
    )
    max_new_tokens: int = setting(default=128, help="generation cap per answer, in tokens")

    def check(self, prefix: str) -> list[str]:
        problems = [*super().check(prefix), *_positive(prefix, "max_new_tokens", self.max_new_tokens)]
        if self.num_generations is None or self.num_generations < 0:
            problems.append(f"`{prefix}.num_generations={self.num_generations}` must be a non-negative integer")
        return problems


class PerplexityEvalSettings(TaskEvalSettings):
    """task.eval of task=pretrain / biomed / finance: held-out perplexity, then zero-shot multiple choice."""

    batch_size: int = setting(default=8, help="examples per evaluation batch")
    max_len: int = setting(
        default=1024,
        help="longest benchmark input in tokens (also capped by the model's context); longer prompts lose their start",
    )
    benchmarks: list[str] | None = setting(default=None, help="which of task.benchmarks to run (null: all)")

    def check(self, prefix: str) -> list[str]:
        return [*super().check(prefix), *_positive(prefix, "max_len", self.max_len)]

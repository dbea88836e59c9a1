"""Task registry: each task composes a data builder (mora_train.data) with its evaluator (mora_train.evaluation).

The two never import each other; what one needs from the other (the math answer reader, the
collator that batches tokenized examples, the prompt renderer) is handed over here, one module
per recipe: tasks/uuid.py, math.py, instruction.py, pretrain.py. Task itself is in tasks/task.py.
"""

from __future__ import annotations

from mora_train.tasks import instruction, math, pretrain, uuid
from mora_train.tasks.task import Task

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        uuid.TASK,
        # The recipe modules serve several task names; configs/task/NAME.yaml sets what differs.
        math.task("gsm8k"),
        math.task("metamath"),
        instruction.TASK,
        pretrain.task("biomed", "benchmark_mean_accuracy", greater_is_better=True),
        pretrain.task("finance", "benchmark_mean_accuracy", greater_is_better=True),
        # Pretraining (from scratch or continued): the same packed-text recipe, held-out perplexity only.
        pretrain.task("pretrain", "eval_perplexity", greater_is_better=False),
    )
}

__all__ = ["TASKS", "Task"]

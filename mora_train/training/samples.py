"""`trainer.sample_every`: greedy generations from a few validation prompts, logged as text while training.

The prompts are the first `trainer.num_samples` validation examples, read from their tokens whatever the task:
a prompt -> completion example (instruction, math, UUID) is cut where its labels start, so the prompt is what
the model is asked and the reference is what it learns to answer; raw text (pretraining blocks, where every
token is learned) is cut after its first tokens. Each sample goes to every tracker of `logging.report_to`
(TensorBoard text under `samples`, a W&B table `samples`, MLflow artifacts samples/step-N.md) and to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationMixin, TrainerCallback

from mora_train.data.common import IGNORE_INDEX

log = logging.getLogger(__name__)

TEXT_PROMPT_TOKENS = 32  # the prompt taken from raw text: its first tokens (at most half of the example)
TAG = "samples"


@dataclass(frozen=True)
class SamplePrompt:
    prompt_ids: list[int]
    reference_ids: list[int]  # what the data says comes next (the labelled answer, or the text that follows)


def sample_prompt(example: dict[str, Any], max_new_tokens: int) -> SamplePrompt | None:
    """The prompt and reference of a tokenized example (None when it has nothing to prompt with)."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    if start <= 1:  # every token is learned (raw text): prompt with its beginning
        start = min(TEXT_PROMPT_TOKENS, len(ids) // 2)
        end = start + max_new_tokens
    else:  # the first labelled run is the answer
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    if start < 1 or start >= len(ids):
        return None
    return SamplePrompt(ids[:start], ids[start : min(end, start + max_new_tokens)])


def sample_prompts(examples: Sequence[dict[str, Any]], count: int, max_new_tokens: int) -> list[SamplePrompt]:
    prompts = []
    for index in range(min(len(examples), count * 4)):  # a few spares for examples with nothing to prompt with
        prompt = sample_prompt(examples[index], max_new_tokens)
        if prompt is not None:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[SamplePrompt], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt, one at a time (no padding to get wrong), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    try:
        for prompt in prompts:
            input_ids = torch.tensor([prompt.prompt_ids], device=device)
            generated = cast(GenerationMixin, model).generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max(1, min(max_new_tokens, len(prompt.reference_ids) or max_new_tokens)),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outputs.append(generated[0, input_ids.shape[1] :].tolist())
    finally:
        model.train(was_training)
    return outputs


class SampleGenerations(TrainerCallback):
    """Every `every` optimizer steps (main process): generate from the prompts and log the texts."""

    def __init__(self, examples: Sequence[dict[str, Any]], tokenizer: Any, trainer: Any, trackers: list[Any]) -> None:
        self.tokenizer = tokenizer
        self.every = trainer.sample_every
        self.max_new_tokens = trainer.sample_max_new_tokens
        self.prompts = sample_prompts(examples, trainer.num_samples, trainer.sample_max_new_tokens)
        self.trackers = trackers  # transformers' tracker callbacks (training.tracking.trainer_callbacks)
        self.logged_steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.prompts or state.global_step % self.every or not state.is_world_process_zero:
            return
        generated = generate(model, self.tokenizer, self.prompts, self.max_new_tokens)
        decode = self.tokenizer.decode
        rows = [
            [decode(ids, skip_special_tokens=True) for ids in (p.prompt_ids, out, p.reference_ids)]
            for p, out in zip(self.prompts, generated, strict=True)
        ]
        for i, (prompt, output, _) in enumerate(rows):
            log.info("step %d, sample %d: %r -> %r", state.global_step, i, prompt[-200:], output)
        log_samples(self.trackers, state.global_step, rows)
        self.logged_steps.append(state.global_step)


def as_markdown(step: int, rows: list[list[str]]) -> str:
    """The samples of one step as Markdown (TensorBoard renders its text summaries so)."""
    blocks = [f"### step {step}"]
    for i, (prompt, output, reference) in enumerate(rows):
        blocks += [f"**sample {i}: prompt**", _fenced(prompt), "**generated**", _fenced(output)]
        blocks += ["**reference**", _fenced(reference)]
    return "\n\n".join(blocks)


def _fenced(text: str) -> str:
    return "\n".join("    " + line for line in (text or "(empty)").splitlines() or [""])  # an indented code block


def log_samples(trackers: list[Any], step: int, rows: list[list[str]]) -> None:
    """The samples to each tracker; a tracker that fails only warns (the run goes on)."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    text = as_markdown(step, rows)
    for tracker in trackers:
        try:
            if isinstance(tracker, TensorBoardCallback) and tracker.tb_writer is not None:
                tracker.tb_writer.add_text(TAG, text, global_step=step)
                tracker.tb_writer.flush()
            elif isinstance(tracker, WandbCallback):
                import wandb

                if wandb.run is not None:
                    table = wandb.Table(columns=["prompt", "generated", "reference"], data=rows)
                    wandb.run.log({TAG: table, "train/global_step": step})
            elif isinstance(tracker, MLflowCallback):
                import mlflow

                if mlflow.active_run() is not None:
                    mlflow.log_text(text, f"{TAG}/step-{step:06d}.md")
        except Exception as err:  # noqa: BLE001 - a tracker failing to take text never stops training
            name, why = type(tracker).__name__, f"{type(err).__name__}: {err}"
            log.warning("could not log the samples of step %d to %s (%s)", step, name, why)

"""The paper's UUID memorization task: N random key -> value UUID pairs, learned by heart.

Pairs are generated from task.data_seed, so the same config always gives the same pairs.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from mora_train.data.common import encode_prompt_completion


def uuid_pairs(num_pairs: int, data_seed: int) -> list[tuple[str, str]]:
    rng = random.Random(data_seed)
    return [(str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128), version=4))) for _ in range(num_pairs)]


@dataclass
class UUIDData:
    train: list[dict]
    prompts: list[str]  # one per key, for evaluation by generation
    targets: list[str]  # the value each prompt must produce


def config_problems(task_cfg: DictConfig) -> list[str]:
    problems = []
    n = task_cfg.get("num_pairs")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        problems.append(f"`task.num_pairs={n}` must be a positive integer")
    for key, field in (("prompt_template", "{key}"), ("completion_template", "{value}")):
        template = task_cfg.get(key)
        if not isinstance(template, str) or field not in template:
            problems.append(f"`task.{key}={template!r}` must be a string containing {field}")
    return problems


def build(task_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> UUIDData:
    pairs = uuid_pairs(task_cfg.num_pairs, task_cfg.data_seed)
    prompts = [task_cfg.prompt_template.format(key=k) for k, _ in pairs]
    completions = [task_cfg.completion_template.format(value=v) for _, v in pairs]
    train = [encode_prompt_completion(tokenizer, p, c, max_seq_len) for p, c in zip(prompts, completions)]
    return UUIDData(train=train, prompts=prompts, targets=[v for _, v in pairs])

"""The paper's UUID memorization task: N random key -> value UUID pairs, learned by heart.

Pairs are generated from task.data_seed, so the same config always gives the same pairs.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from mora_train.config.schema import Section, setting
from mora_train.data.common import encode_prompt_completion


def uuid_pairs(num_pairs: int, data_seed: int) -> list[tuple[str, str]]:
    rng = random.Random(data_seed)
    return [
        (str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        for _ in range(num_pairs)
    ]


@dataclass
class UUIDData:
    train: list[dict]
    prompts: list[str]  # one per key, for evaluation by generation
    targets: list[str]  # the value each prompt must produce


class UuidRecipe(Section):
    """The UUID pairs and how they are written (task=uuid; tasks/uuid.py adds the evaluation settings)."""

    name: str = setting(help="the task (chosen by task=NAME)")
    num_pairs: int = setting(default=16, help="how many random key -> value UUID pairs to learn")
    data_seed: int = setting(default=0, help="the seed the pairs are drawn from (the same seed gives the same pairs)")
    prompt_template: str = setting(default="Key: {key}\nValue:", help="the prompt of each pair; must contain {key}")
    completion_template: str = setting(default=" {value}", help="what the model learns to write; must contain {value}")

    def check(self, prefix: str) -> list[str]:
        problems = []
        if self.num_pairs < 1:
            problems.append(f"`{prefix}.num_pairs={self.num_pairs}` must be a positive integer")
        for key, template, field in (
            ("prompt_template", self.prompt_template, "{key}"),
            ("completion_template", self.completion_template, "{value}"),
        ):
            if field not in template:
                problems.append(f"`{prefix}.{key}={template!r}` must be a string containing {field}")
        return problems


def build(settings: UuidRecipe, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> UUIDData:
    pairs = uuid_pairs(settings.num_pairs, settings.data_seed)
    prompts = [settings.prompt_template.format(key=k) for k, _ in pairs]
    completions = [settings.completion_template.format(value=v) for _, v in pairs]
    train = [encode_prompt_completion(tokenizer, p, c, max_seq_len) for p, c in zip(prompts, completions, strict=True)]
    return UUIDData(train=train, prompts=prompts, targets=[v for _, v in pairs])

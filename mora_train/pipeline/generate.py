"""Many exported adapters on one base model, one batch: `mora-train-generate`.

peft keeps every loaded LoRA beside the base weights and, given `adapter_names=` (one name per row),
routes each row of a batch through its own adapter — the way serving engines batch requests across
adapters (S-LoRA / Punica). Greedy decoding, so each row's output equals running its adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_text_atomically
from mora_train.core.outputs import FILE, check_output_target
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import named_model_config

BASE = "__base__"  # peft's name for "no adapter" in adapter_names


def read_requests(path: Path, adapters: dict[str, Path]) -> list[dict[str, Any]]:
    """JSONL records {"adapter": NAME or null, "prompt": TEXT}; every problem named with its line."""
    requests = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MoraTrainError(f"cannot read the requests file {path}: {err}") from None
    except UnicodeDecodeError as err:  # bad input, not a bug: say where
        raise MoraTrainError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save the requests file as UTF-8 JSONL"
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise MoraTrainError(f"{path} line {number}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise MoraTrainError(
                f'{path} line {number}: needs {{"adapter": NAME or null, "prompt": TEXT}}, got {line[:120]}'
            )
        name = record.get("adapter")
        if name is not None and name not in adapters:
            raise MoraTrainError(
                f"{path} line {number}: adapter {name!r} was not loaded; loaded: {sorted(adapters)} "
                "(add --adapter NAME=FOLDER, or null for the base model)"
            )
        requests.append({"adapter": name, "prompt": record["prompt"]})
    if not requests:
        raise MoraTrainError(f"{path} holds no requests")
    return requests


def load_many(base_model: str, adapters: dict[str, Path]) -> tuple[Any, Any]:
    """The base model with every adapter loaded under its name (plain peft), and its tokenizer."""
    from peft import PeftModel

    if not adapters:
        raise MoraTrainError("give at least one --adapter NAME=FOLDER (an exported LoRA folder)")
    items = list(adapters.items())
    for name, folder in items:  # before the base model loads: a wrong folder is refused at once
        if not (Path(folder) / "adapter_config.json").is_file():
            raise MoraTrainError(
                f"--adapter {name}={folder}: not a PEFT adapter folder (export one with mora-train-export)"
            )
    base, tokenizer = load_model_and_tokenizer(named_model_config(base_model))
    model = PeftModel.from_pretrained(base, str(items[0][1]), adapter_name=items[0][0])
    for name, folder in items[1:]:
        model.load_adapter(str(folder), adapter_name=name)
    return model.eval(), tokenizer


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, requests: list[dict[str, Any]], max_new_tokens: int = 64, batch_size: int = 8
) -> list[str]:
    """Greedy completions, batches mixing adapters (each row through its own)."""
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    completions: list[str] = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        inputs = tokenizer([r["prompt"] for r in batch], return_tensors="pt", padding=True)
        names = [r["adapter"] or BASE for r in batch]
        out = model.generate(
            **inputs,
            adapter_names=names,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    return completions


def is_earlier_answers(path: Path) -> bool:
    """True for a file this command wrote: JSONL whose first record has a prompt and a completion."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(1 << 16)  # bounded: the file may be anything, a huge binary one included
        record = json.loads(next((line for line in head.splitlines() if line.strip()), ""))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"prompt", "completion"} <= record.keys()


def run_generate(
    base_model: str,
    adapters: dict[str, Path],
    requests_path: Path,
    output: Path,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    # Before the model loads: the answers never replace the requests, an adapter's files or a file of the user's.
    output = check_output_target(
        output,
        "mora-train-generate",
        "--output",
        FILE,
        [requests_path, base_model, *adapters.values()],
        ours=is_earlier_answers,
    )
    requests = read_requests(requests_path, adapters)
    model, tokenizer = load_many(base_model, adapters)
    completions = generate(model, tokenizer, requests, max_new_tokens, batch_size)
    results = [{**r, "completion": c} for r, c in zip(requests, completions, strict=True)]
    write_text_atomically(Path(output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return results

"""The GGUF export's check: transformers' own GGUF loader reads the file back, and its logits are compared with the
merged model's — a reader written by others, which reverses llama.cpp's layout (tensor names, the Llama q/k row
order, tied LM head, hyper-parameters) on its own.

Two numbers, both on a fixed probe batch, computed in float64 where the model is small enough (checks.check_dtype):

- `max_abs_diff` (the check, pass or fail): the file read back against the merged model *with every weight
  rounded as the file stores it* (f16, bf16 or Q8_0 through the gguf package's own quantizers; norms and biases
  stay float32). A correct file holds exactly those weights, so the two forwards are the same computation and
  differ by nothing (measured: 0.0 on the tiny Llama and Qwen2 and on SmolLM2, every output type); the tolerance is
  the merge check's float32 floor (1e-4). A wrong tensor name, head order, tie or hyper-parameter moves the
  logits by the size of the weights' contribution, orders of magnitude more.
- `outtype_max_abs_diff` (reported, the cost of the output type): the file read back against the merged model
  itself — 0 for f32, the rounding of every weight to 16 bits or to 8-bit blocks otherwise.

The tokenizer read back from the file by transformers must encode a probe text as the model's own does, except
for llama.cpp's `smollm` pre-tokenizer, which transformers' GGUF reader does not implement (it splits digits
like `gpt-2`); llama.cpp itself splits as written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from mora_train.export.checks import MERGE_TOLERANCE, check_dtype, merge_tolerance
from mora_train.export.delta import load_merged
from mora_train.export.gguf import tensor_type
from mora_train.export.gguf_vocab import PROBE_TEXT
from mora_train.export.probe import logits_of, random_probe_ids

log = logging.getLogger(__name__)

# Pre-tokenizers transformers' GGUF reader rebuilds differently from llama.cpp (see the module docstring).
READER_SPLITS_DIFFER = {"smollm"}


@dataclass
class GGUFCheck:
    max_abs_diff: float  # file read back vs the merged model with the file's rounding
    tolerance: float
    outtype_max_abs_diff: float  # file read back vs the merged model itself
    max_abs_logit: float  # the scale of the logits compared
    compared_in: str  # the dtype the logits were computed in
    # transformers' tokenizer from the file encodes the probe text as the model's own (None: not comparable, the
    # pre-tokenizer is one transformers' reader rebuilds differently)
    tokenizer_matches: bool | None

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.tokenizer_matches is not False


def round_as_stored(model: torch.nn.Module, outtype: str) -> None:
    """Every parameter of `model` replaced, in place, by what a GGUF file of `outtype` stores for it."""
    with torch.no_grad():
        for param in model.parameters():
            qtype = tensor_type(tuple(param.shape), outtype)
            if qtype == gguf.GGMLQuantizationType.F32:
                continue
            array = param.detach().to(torch.float32).cpu().numpy()
            rounded = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)
            param.copy_(torch.from_numpy(rounded.copy()).to(param.dtype))


def _tokenizer_matches(folder: Path, file_name: str, tokenizer: Any) -> bool:
    from transformers import AutoTokenizer

    read_back = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    return bool(read_back.encode(PROBE_TEXT) == tokenizer.encode(PROBE_TEXT))


def check_gguf(
    model_dir: Path, folder: Path, file_name: str, outtype: str, tokenizer: Any, tokenizer_pre: str
) -> GGUFCheck:
    """Read folder/file_name back with transformers and compare it with the model folder `model_dir`."""
    from transformers import AutoModelForCausalLM

    reference = load_merged(model_dir)
    ids = random_probe_ids(reference.config.vocab_size)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    compare = check_dtype(reference)
    exact = logits_of(reference, batch, compare)
    round_as_stored(reference, outtype)
    rounded = logits_of(reference, batch, compare)
    del reference
    read_back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32).eval()
    got = logits_of(read_back, batch, compare)
    del read_back
    tolerance = MERGE_TOLERANCE[torch.float32] if compare == torch.float64 else merge_tolerance(torch.float32, 0, got)
    matches = None if tokenizer_pre in READER_SPLITS_DIFFER else _tokenizer_matches(folder, file_name, tokenizer)
    return GGUFCheck(
        max_abs_diff=float((got - rounded).abs().max()),
        tolerance=tolerance,
        outtype_max_abs_diff=float((got - exact).abs().max()),
        max_abs_logit=float(exact.abs().max()),
        compared_in=str(compare or torch.float32).removeprefix("torch."),
        tokenizer_matches=matches,
    )

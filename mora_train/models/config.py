"""The `model` section: which base model, how it is loaded, and its optional 4-/8-bit quantization."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch

from mora_train.config.schema import Section, setting
from mora_train.core.errors import package_hint
from mora_train.core.paths import looks_like_local_path, package_dir
from mora_train.models.hub import hub_id_problems

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ModelDtype = Literal["float32", "bfloat16", "float16", "auto"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]


class QuantizationOptions(Section):
    double_quant: bool = setting(
        default=True, help="4-bit: quantize the per-block scales too (QLoRA's double quantization)"
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = setting(
        default=None,
        help="dtype the quantized layers compute in; null: model.dtype (bfloat16 is the usual choice on a GPU)",
    )
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = setting(
        default="uint8", help="how packed 4-bit codes are stored"
    )
    int8_threshold: float = setting(default=6.0, help="int8: LLM.int8's outlier threshold")

    def check(self, prefix: str) -> list[str]:
        if self.int8_threshold < 0:
            return [f"`{prefix}.int8_threshold={self.int8_threshold}` must be a number >= 0 (6.0 is LLM.int8's)"]
        return []


class ModelConfig(Section):
    name_or_path: str | None = setting(
        default=None, help="Hugging Face Hub id, local folder with config.json, or .gguf file (null with random_init)"
    )
    package: str | None = setting(default=None, help="an installed Python package whose folder holds name_or_path")
    tokenizer: str | None = setting(
        default=None, help="tokenizer source (Hub id or folder), `byte` for a byte-level one; null: the model's own"
    )
    dtype: ModelDtype = setting(default="float32", help="dtype the weights are loaded and computed in")
    attn_implementation: AttnImplementation | None = setting(
        default=None,
        help="attention kernel: eager, sdpa or flash_attention_2 (needs flash-attn and a CUDA GPU); null: "
        "transformers' choice (sdpa where the model supports it)",
    )
    trust_remote_code: bool = setting(default=False, help="allow the model's own Python code from the Hub (auto_map)")
    revision: str | None = setting(default=None, help="Hub revision (branch, tag or commit) of model and tokenizer")
    hub_id: str | None = setting(
        default=None,
        help="the Hub id these weights correspond to (model cards, LoRA exports); null: name_or_path if it is a Hub id",
    )
    hub_id_note: str | None = setting(
        default=None, help="how the weights differ from hub_id's, one sentence; null: said for GGUF and 4-/8-bit bases"
    )
    cache_dir: str = setting(default="~/.cache/mora-train", help="where converted GGUF models are cached")
    random_init: dict[str, Any] | None = setting(
        default=None, help="build a random model instead: architecture plus its transformers config fields"
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] | None = setting(
        default="none", help="load the base in 4 bits (nf4, fp4) or 8 bits (int8) with bitsandbytes; none: as dtype"
    )
    quantization_options: QuantizationOptions = setting(
        factory=QuantizationOptions, help="bitsandbytes settings of a quantized base"
    )

    @property
    def quantization_name(self) -> str:
        """model.quantization, with null meaning none."""
        return self.quantization or "none"

    @property
    def is_quantized(self) -> bool:
        return self.quantization_name != "none"

    @property
    def compute_dtype_name(self) -> str:
        """The dtype the quantized layers compute in: quantization_options.compute_dtype, else model.dtype."""
        compute = self.quantization_options.compute_dtype or self.dtype
        return "float32" if compute == "auto" else compute

    def check(self, prefix: str) -> list[str]:
        problems: list[str] = []
        name, package = self.name_or_path, self.package
        if name is None and self.random_init is None:
            problems.append(
                f"set `{prefix}.name_or_path` (hub id, local folder or .gguf file) or `{prefix}.random_init`"
            )
        conflict = model_source_conflict(name, self.random_init)
        if conflict:
            problems.append(conflict)
        if package is not None:
            if importlib.util.find_spec(package) is None:
                problems.append(
                    f"`{prefix}.package={package}` is not installed; install it with "
                    f"`pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does this)"
                )
            elif name is not None and not (package_dir(package) / name).exists():
                problems.append(package_hint(name, package, package_dir(package)))
        elif name is not None and looks_like_local_path(name) and not Path(name).expanduser().exists():
            problems.append(
                f"`{prefix}.name_or_path={name}` does not exist; give an existing folder with config.json, "
                "a .gguf file, or a Hugging Face Hub id such as Qwen/Qwen2.5-0.5B"
            )
        if name is not None and name.endswith(".gguf") and importlib.util.find_spec("gguf") is None:
            problems.append(
                f"`{prefix}.name_or_path={name}` is a GGUF file, which needs the `gguf` package: pip install gguf"
            )
        problems += hub_id_problems(prefix, self.hub_id)
        return problems + self._quantization_problems(prefix) + attn_implementation_problems(self, prefix)

    def _quantization_problems(self, prefix: str) -> list[str]:
        name = self.quantization_name
        if name == "none":
            return []
        problems = []
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"`{prefix}.quantization={name}` needs bitsandbytes, which is not installed; `pip install "
                "'mora-train[quantization]'` (bitsandbytes>=0.45: 4-bit and 8-bit layers on CUDA and on CPU)"
            )
        if self.compute_dtype_name == "float16" and not torch.cuda.is_available():
            problems.append(
                f"`{prefix}.quantization_options.compute_dtype=float16` needs a CUDA GPU (float16 matmuls on CPU are "
                "unsupported or very slow); use compute_dtype=float32 or bfloat16 here"
            )
        return problems


def model_source_conflict(name_or_path: Any, random_init: Any) -> str | None:
    """Both model sources set: the model would be one and the summary name the other, so neither wins silently."""
    if name_or_path is None or random_init is None:
        return None
    return (
        f"`model.name_or_path={name_or_path}` and `model.random_init` are both set, so it is unclear which model to "
        "train (random_init builds a random model and would ignore name_or_path). To load name_or_path add "
        "model.random_init=null (and model.tokenizer=null for its own tokenizer, if the model config set one); "
        "to train from a random start, drop model.name_or_path (or set it to null)"
    )


def attn_implementation_problems(model: ModelConfig, prefix: str) -> list[str]:
    # It computes in bfloat16/float16: float32 weights work under trainer.precision=bf16/fp16 (autocast).
    """flash_attention_2 needs its package and a CUDA GPU, which transformers would report as a bare ImportError."""
    if model.attn_implementation != "flash_attention_2":
        return []
    key = f"`{prefix}.attn_implementation=flash_attention_2`"
    if importlib.util.find_spec("flash_attn") is None:
        install = "`pip install flash-attn --no-build-isolation` on a CUDA machine"
        return [f"{key} needs the flash-attn package, which is not installed: {install}, or use sdpa instead"]
    if not torch.cuda.is_available():
        return [f"{key} needs a CUDA GPU and none is visible; use {prefix}.attn_implementation=sdpa (or eager)"]
    return []

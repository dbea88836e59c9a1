"""A transformers model folder (a run's merged/) as one llama.cpp GGUF file, and an Ollama Modelfile beside it.

Written with the `gguf` package (llama.cpp's own Python writer): its tensor-name map for the architecture turns
each transformers weight name into llama.cpp's (`model.layers.0.self_attn.q_proj.weight` ->
`blk.0.attn_q.weight`), its quantizers write f16 / bf16 / Q8_0, and GGUFWriter the file. Tensors are streamed
one at a time from the safetensors files into the open file (header and tensor table first, then each tensor's
data), so no second copy of the model is ever held.

What the file holds, as llama.cpp's convert_hf_to_gguf.py writes it for the same architectures:
- the architecture's hyper-parameters (context length, widths, heads, RoPE base, RMSNorm epsilon, vocabulary);
- every weight: 1-D tensors (norms, biases) always in float32, matrices in the output type; Q8_0 quantizes rows
  in blocks of 32, so a matrix whose rows are not a multiple of 32 is written in f16 instead;
- for the Llama architecture, the query and key projections with each head's rows reordered: llama.cpp's Llama
  graph rotates interleaved pairs (2i, 2i+1), transformers rotates the halves (i, i + d/2) — the inverse of the
  `reverse_permute` transformers' GGUF loader applies when it reads such a file. Qwen2 rotates halves in both;
- no `output.weight` when the model ties its LM head to the embeddings (llama.cpp then uses `token_embd`);
- the tokenizer (mora_train.export.gguf_vocab).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from mora_train.config.quiet import logger_level
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_text_atomically
from mora_train.export.gguf_vocab import add_vocab, read_vocab

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# The output type a model's own float dtype maps to, when none is asked for: nothing is rounded.
OUTTYPE_OF_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_QTYPE = gguf.GGMLQuantizationType
_MATRIX_TYPE = {"f32": _QTYPE.F32, "f16": _QTYPE.F16, "bf16": _QTYPE.BF16, "q8_0": _QTYPE.Q8_0}
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# transformers model_type -> llama.cpp architecture; and the ones whose q/k rows are reordered (module docstring).
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
ROTATES_PAIRS = {"llama"}
# Buffers some checkpoints hold that are not weights (RoPE frequencies are recomputed from the metadata).
NOT_WEIGHTS = (".rotary_emb.inv_freq",)
MODELFILE = "Modelfile"


def gguf_file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


@dataclass
class GGUFFile:
    """What was written: the export report's record."""

    path: Path
    outtype: str
    architecture: str
    tokenizer_pre: str
    chat_template: bool
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> how many tensors
    bytes: int = 0


@dataclass
class _Planned:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty typed array (a tokenizer without merges, see gguf_vocab)."""

    def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def tensor_type(shape: tuple[int, ...] | torch.Size, outtype: str) -> gguf.GGMLQuantizationType:
    """The ggml type a tensor of `shape` is written in for `outtype` (module docstring)."""
    if len(shape) < 2:
        return _QTYPE.F32
    qtype = _MATRIX_TYPE[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return _QTYPE.F16 if shape[-1] % block else qtype


def rotate_pairs_permutation(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Each head's rows reordered from transformers' rotate-half RoPE layout to llama.cpp's interleaved pairs."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _check_config(config: Any) -> gguf.MODEL_ARCH:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise MoraTrainError(
            f"the model's architecture {config.model_type!r} is not one the GGUF export writes "
            f"({', '.join(ARCHITECTURES)}); convert RUN_DIR/merged with llama.cpp's convert_hf_to_gguf.py instead"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise MoraTrainError(
            f"the model uses {rope['rope_type']!r} RoPE scaling, which the GGUF export does not write (it writes "
            "unscaled RoPE); convert RUN_DIR/merged with llama.cpp's convert_hf_to_gguf.py instead"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise MoraTrainError(
            f"the model's activation {config.hidden_act!r} is not SiLU, which llama.cpp's {config.model_type} "
            "graph computes; convert RUN_DIR/merged with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return arch


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _add_hparams(writer: gguf.GGUFWriter, config: Any, outtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_FILE_TYPE[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise MoraTrainError(
        f"{model_dir} holds no safetensors weights (model.safetensors or its index); the GGUF export reads a "
        "folder written by save_pretrained (as RUN_DIR/merged is)"
    )


def _plan(model_dir: Path, config: Any, arch: gguf.MODEL_ARCH, outtype: str) -> list[_Planned]:
    """Every weight to write, in file order, with its GGUF name and type; unknown weights are refused by name."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    planned, unknown, has_head = [], [], False
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as weights:
            for hf_name in weights.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if hf_name.endswith(NOT_WEIGHTS):
                    continue
                has_head = has_head or hf_name == "lm_head.weight"
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # the same matrix as the embeddings: llama.cpp uses token_embd for both
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    unknown.append(hf_name)
                    continue
                shape = tuple(weights.get_slice(hf_name).get_shape())
                planned.append(_Planned(hf_name, gguf_name, file, shape, tensor_type(shape, outtype)))
    if unknown:
        raise MoraTrainError(
            f"{model_dir} holds weights the {config.model_type} GGUF layout has no place for "
            f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); convert it with llama.cpp's "
            "convert_hf_to_gguf.py instead"
        )
    if not config.tie_word_embeddings and not has_head:
        raise MoraTrainError(f"{model_dir} has no lm_head.weight though its config does not tie it to the embeddings")
    return planned


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    if qtype in (_QTYPE.F32, _QTYPE.F16):
        return math.prod(shape) * (4 if qtype == _QTYPE.F32 else 2)
    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def _encoded(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    array = tensor.to(torch.float32).contiguous().numpy()
    if qtype == _QTYPE.F32:
        return array
    if qtype == _QTYPE.F16:
        return array.astype(np.float16)
    return np.asarray(gguf.quants.quantize(array, qtype))


def _tensors(planned: list[_Planned], config: Any) -> Iterator[tuple[_Planned, torch.Tensor]]:
    """Each planned weight, read when it is written; q/k rows reordered where the architecture needs it."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    with contextlib.ExitStack() as stack:
        files: dict[Path, Any] = {}
        for item in planned:
            if item.file not in files:
                files[item.file] = stack.enter_context(safe_open(str(item.file), framework="pt"))
            tensor = files[item.file].get_tensor(item.hf_name)
            if config.model_type in ROTATES_PAIRS and ".attn_q." in f".{item.gguf_name}":
                tensor = rotate_pairs_permutation(tensor, n_head)
            elif config.model_type in ROTATES_PAIRS and ".attn_k." in f".{item.gguf_name}":
                tensor = rotate_pairs_permutation(tensor, n_kv)
            yield item, tensor


def write_gguf(model_dir: Path, path: Path, outtype: str, name: str, config: Any, tokenizer: Any) -> GGUFFile:
    """Write the model folder `model_dir` (its `config` and `tokenizer` loaded by the caller) as `path`."""
    if outtype not in OUTTYPES:
        raise MoraTrainError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    arch = _check_config(config)
    planned = _plan(model_dir, config, arch, outtype)
    vocab = read_vocab(model_dir, tokenizer, config.vocab_size)
    with logger_level(
        "gguf", logging.WARNING
    ):  # its INFO lines (endianness, the file plan) say nothing the summary does not
        writer = _Writer(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _add_hparams(writer, config, outtype, name)
    add_vocab(writer, vocab)
    types: dict[str, int] = {}
    for item in planned:
        dtype = np.dtype(np.float16 if item.qtype == _QTYPE.F16 else np.float32)
        raw = None if item.qtype in (_QTYPE.F32, _QTYPE.F16) else item.qtype
        writer.add_tensor_info(item.gguf_name, item.shape, dtype, _nbytes(item.shape, item.qtype), raw_dtype=raw)
        types[item.qtype.name] = types.get(item.qtype.name, 0) + 1
    with logger_level("gguf", logging.WARNING):
        writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for item, tensor in _tensors(planned, config):
            writer.write_tensor_data(_encoded(tensor, item.qtype))
    finally:
        writer.close()
    return GGUFFile(
        path,
        outtype,
        gguf.MODEL_ARCH_NAMES[arch],
        vocab.pre,
        vocab.chat_template is not None,
        types,
        path.stat().st_size,
    )


def modelfile_text(gguf_name: str, vocab_has_chat_template: bool) -> str:
    """An Ollama Modelfile for the GGUF file next to it."""
    lines = [
        "# Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME` (written by mora-train-export).",
        f"FROM ./{gguf_name}",
        "# Greedy decoding, as mora-train's own evaluation answers.",
        "PARAMETER temperature 0",
    ]
    if vocab_has_chat_template:
        lines.insert(
            2,
            "# The chat template is in the GGUF file (tokenizer.chat_template): Ollama uses it when it recognises it;"
            " otherwise add a TEMPLATE line.",
        )
    else:
        lines += [
            "# The model has no chat template: a prompt reaches it exactly as written, as in its training.",
            'TEMPLATE """{{ .Prompt }}"""',
        ]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, written: GGUFFile) -> Path:
    path = folder / MODELFILE
    write_text_atomically(path, modelfile_text(written.path.name, written.chat_template))
    return path

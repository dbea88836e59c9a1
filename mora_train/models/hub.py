"""Which Hugging Face Hub model a base model's weights correspond to, and how the weights trained on differ.

Model cards (`base_model`) and LoRA exports (`base_model_name_or_path`) name the base by its Hub id, so that the Hub
links the model to its base and a serving engine fetches the right one. A base loaded from a local folder, a GGUF
file or a file shipped in a Python package has no Hub id of its own: `model.hub_id` names it, and
`base_weights_note` says in one sentence when those weights are not exactly the Hub id's (a de-quantized GGUF
file, a 4-/8-bit base).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from mora_train.core.paths import looks_like_local_path, package_dir

if TYPE_CHECKING:
    from mora_train.models.config import ModelConfig

log = logging.getLogger(__name__)

# GGUF file types (general.file_type, gguf.LlamaFileType without its MOSTLY_ prefix) that hold float weights.
UNQUANTIZED_GGUF = ("ALL_F32", "F16", "BF16")


def hub_id_problems(prefix: str, hub_id: str | None) -> list[str]:
    """`model.hub_id` must be a Hub model id (org/name), never a local path or a file."""
    if hub_id is None:
        return []
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_id)
        valid = not looks_like_local_path(hub_id)
    except HFValidationError:
        valid = False
    if valid:
        return []
    return [
        (
            f"`{prefix}.hub_id={hub_id}` is not a Hugging Face Hub model id; give the id the weights correspond to, "
            "such as HuggingFaceTB/SmolLM2-135M-Instruct (or null when they correspond to none)"
        )
    ]


def base_model_id(config: ModelConfig) -> str | None:
    """The Hub id of the base model: `model.hub_id`; else `model.name_or_path` when that is a Hub id (not a local
    folder, a .gguf file or a file of `model.package`); else None (a random model, a folder of unknown origin).

    What a model card's `base_model` and a LoRA export's `base_model_name_or_path` hold."""
    if config.hub_id is not None:
        return config.hub_id
    name = config.name_or_path
    if name is None or config.package is not None or config.random_init is not None or looks_like_local_path(name):
        return None
    return name


def base_weights_note(config: ModelConfig) -> str | None:
    """One sentence on how the weights the run trained on differ from `base_model_id`'s, or None when they are
    that id's own: `model.hub_id_note`; else said for a base converted from a GGUF file and for a 4-/8-bit base."""
    if config.hub_id_note is not None:
        return config.hub_id_note
    notes = []
    name = config.name_or_path
    if name is not None and name.endswith(".gguf"):
        kind = gguf_file_type(_local_file(name, config.package))
        notes.append(_gguf_note(Path(name).name, kind, base_model_id(config)))
    if config.is_quantized:
        notes.append(
            f"Training ran on the base quantized to {config.quantization_name} (bitsandbytes); the merged checkpoint "
            "holds the de-quantized weights plus the update, which differ from the original weights by that "
            "quantization's rounding."
        )
    return " ".join(notes) or None


def _gguf_note(file: str, kind: str | None, hub_id: str | None) -> str:
    of = f" of {hub_id}" if hub_id else ""
    if kind in UNQUANTIZED_GGUF:
        return f"The base weights were read from the GGUF file {file} ({kind}, not quantized){of}."
    if kind is None:
        return (
            f"The base weights were de-quantized from the GGUF file {file}{of}: where that file is quantized they "
            "differ from the original weights by its rounding."
        )
    return (
        f"The base weights were de-quantized from the GGUF file {file} ({kind} quantization){of}: they differ from "
        "the original weights by that quantization's rounding."
    )


def _local_file(name: str, package: str | None) -> Path:
    if package is None:
        return Path(name).expanduser()
    try:
        return package_dir(package) / name
    except Exception:  # noqa: BLE001 - a package that is gone only costs the note its quantization type
        return Path(name)


def gguf_file_type(path: Path) -> str | None:
    """The quantization a GGUF file records (`general.file_type`, e.g. Q4_1), or None when unreadable."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.file_type"]
        name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    except Exception as err:  # noqa: BLE001 - the note names the file anyway; its type is a detail
        log.debug("cannot read the file type of %s: %s", path, err)
        return None
    return name.removeprefix("MOSTLY_")

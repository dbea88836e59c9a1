"""Load a base model and its tokenizer: hub id, local folder, GGUF file, or a tiny random config."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mora_train.core.errors import MoraTrainError, package_hint
from mora_train.core.io import write_dir_atomically
from mora_train.core.paths import looks_like_local_path, package_dir
from mora_train.models.config import ModelConfig, model_source_conflict
from mora_train.models.quantization import bitsandbytes_config, quantized_device_map, set_plain_attribute

log = logging.getLogger(__name__)

DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code (no file, no network): 3 specials + 256 bytes.

    Every byte is one token, so any text round-trips; good enough for tiny test models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _attention(model: ModelConfig) -> dict[str, Any]:
    """from_pretrained/from_config's attn_implementation, when model.attn_implementation chooses one."""
    return {"attn_implementation": model.attn_implementation} if model.attn_implementation else {}


def _random_model(
    init: dict, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, attention: dict[str, Any]
) -> PreTrainedModel:
    from transformers import AutoConfig

    init = dict(init)
    architecture = init.pop("architecture", "llama")
    init_seed = init.pop("init_seed", 0)
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **init,
    )
    # Own generator seed: the base must be identical whatever the training seed, so that a saved
    # adapter can be re-attached to a rebuilt base.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config, **attention)
    return model.to(dtype)


def _gguf_cache_dir(gguf_path: Path, cache_dir: str) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, cache_dir: str) -> Path:
    """De-quantize a GGUF file once into a safetensors folder under cache_dir; return that folder.

    Loading a GGUF de-quantizes every tensor (~20 s for SmolLM2-135M); the cached folder loads in ~1 s.
    """
    target = _gguf_cache_dir(gguf_path, cache_dir)
    if (target / "config.json").exists():
        return target
    log.info("De-quantizing %s once into %s (cached for later runs)", gguf_path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as err:  # noqa: BLE001 - a corrupt or unsupported GGUF file
        raise MoraTrainError(
            f"could not read the GGUF file {gguf_path} ({type(err).__name__}: {_first_line(err)}); it is corrupt, "
            "truncated or of an architecture transformers cannot de-quantize. Download it again or use a model folder"
        ) from None
    # The weights are already float; without this save_pretrained refuses a "quantized" model.
    set_plain_attribute(model, "hf_quantizer", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # A killed conversion leaves only a .tmp folder, never a half-written cache entry; when another
    # process finished the same conversion first, theirs is kept (it is as good as ours).
    write_dir_atomically(target, write, keep_existing=True)
    return target


def resolve_model_path(model: ModelConfig) -> str:
    """The folder or hub id to load from; GGUF files are converted (once) into a cached folder."""
    name = str(model.name_or_path)
    if model.package:
        inside = package_dir(model.package) / name
        if not inside.exists():
            raise MoraTrainError(package_hint(name, model.package, inside.parent))
        name = str(inside)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise MoraTrainError(f"GGUF file {path} does not exist; set model.name_or_path to an existing .gguf file")
        return str(convert_gguf(path, model.cache_dir))
    if looks_like_local_path(name):
        if not path.exists():
            raise MoraTrainError(
                f"model folder {path} does not exist; set model.name_or_path to a folder with config.json "
                "and weights, a .gguf file, or a Hugging Face Hub id"
            )
        return str(path)
    return name


def _hub_error(name: str, err: BaseException) -> MoraTrainError:
    return MoraTrainError(
        f"could not load model '{name}' from the Hugging Face Hub ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else 'no details'}). If this machine is offline or the model is "
        f"gated, download it where you have access (`hf download {name} --local-dir DIR`), copy DIR here and "
        "run with model.name_or_path=DIR; a .gguf file also works (model.name_or_path=/path/model.gguf)."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no details"


def _has_custom_code(source: str) -> bool:
    """Whether a local model folder declares custom code (`auto_map` in config.json or tokenizer_config.json)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((Path(source).expanduser() / name).read_text()):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def load_error(what: str, source: str, err: BaseException, key: str = "model.name_or_path") -> MoraTrainError:
    """Any failure to load a model or tokenizer from `source` as the project's error: what, where, the fix.

    The one boundary for user-supplied model artifacts (models.py, mode=eval, spectra): custom code without
    trust_remote_code, corrupt or truncated weights, a folder that is not a model, an unreachable hub id.
    """
    text = str(err)
    if "trust_remote_code" in text or _has_custom_code(source):
        return MoraTrainError(
            f"{source} contains custom code, which runs only with model.trust_remote_code=true; add "
            "model.trust_remote_code=true if you trust its author (it executes that code), or use a model "
            "transformers supports natively"
        )
    local = looks_like_local_path(source) or Path(source).expanduser().exists()
    if not local:
        return _hub_error(source, err)
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file() and what == "model":
        return MoraTrainError(
            f"{key}={source} is not a model folder (no config.json); give a folder written by save_pretrained "
            "(config.json + weights), a .gguf file, or a Hugging Face Hub id"
        )
    corrupt = type(err).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError", "EOFError") or any(
        word in text.lower()
        for word in (
            "incomplete metadata",
            "header too large",
            "invalid header",
            "deserializ",
            "truncated",
            "unexpected end",
            "corrupt",
            "could not open",
            "failed to read",
        )
    )
    if corrupt:
        return MoraTrainError(
            f"the {what} files in {source} cannot be read ({type(err).__name__}: {_first_line(err)}): they are "
            "corrupt or truncated (an interrupted download or copy?). Copy or download them again, or point "
            f"{key} at another folder"
        )
    return MoraTrainError(
        f"could not load a {what} from {source} ({type(err).__name__}: {_first_line(err)}); {key} must be a "
        "folder written by save_pretrained (config.json, weights and tokenizer files), a .gguf file or a hub id"
    )


def load_tokenizer(model: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    if model.tokenizer == "byte":
        tokenizer = byte_tokenizer()
    else:
        source = model.tokenizer or path
        key = "model.tokenizer" if model.tokenizer else "model.name_or_path"
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=model.revision, trust_remote_code=model.trust_remote_code
            )
        except Exception as err:  # noqa: BLE001 - tokenizer backends raise OSError, ValueError, TypeError, ...
            raise load_error("tokenizer", str(source), err, key) from None
        if isinstance(tokenizer, bool) or not callable(tokenizer):
            raise MoraTrainError(f"{source} holds no usable tokenizer; set model.tokenizer to one (a folder or hub id)")
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship without a pad token; labels mask padding, so EOS is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise MoraTrainError(
            f"the tokenizer of {model.tokenizer or path} has neither a pad nor an EOS token; "
            "give a tokenizer that defines an EOS token (model.tokenizer=...)"
        )
    return tokenizer


def load_model_and_tokenizer(model: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load the frozen-to-be base model and its tokenizer, as the `model` section says.

    With model.quantization (nf4 | fp4 | int8) the linear layers are loaded quantized through transformers'
    bitsandbytes integration (models/quantization.py); a random-init model is built in float first and
    quantized from those weights, so a rebuilt base is quantized identically."""
    dtype = DTYPES[model.dtype]
    conflict = model_source_conflict(model.name_or_path, model.random_init)
    if conflict:  # also when called from Python, past the config validation
        raise MoraTrainError(conflict)
    if model.random_init is not None:
        tokenizer = load_tokenizer(model)
        try:
            built = _random_model(model.random_init, tokenizer, dtype, _attention(model))
        except (ValueError, TypeError, KeyError) as err:
            raise MoraTrainError(
                f"model.random_init cannot build a model ({type(err).__name__}: {_first_line(err)}); check its "
                "architecture and sizes (e.g. hidden_size divisible by num_attention_heads)"
            ) from None
        if model.is_quantized:
            built = _quantized_copy(built, model, dtype)
        return built, tokenizer

    path = resolve_model_path(model)
    _require_model_folder(path)
    warn_if_custom_code_unused(path, model.trust_remote_code)
    tokenizer = load_tokenizer(model, path)
    return _load_pretrained(path, model, dtype), tokenizer


def _load_pretrained(path: str, model: ModelConfig, dtype: Any) -> PreTrainedModel:
    quantized = {}
    if model.is_quantized:
        quantized = {"quantization_config": bitsandbytes_config(model), "device_map": quantized_device_map()}
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            **quantized,
            **_attention(model),
        )
    except Exception as err:  # noqa: BLE001 - the loading boundary: every failure becomes a MoraTrainError
        raise load_error("model", path, err) from None


def _quantized_copy(built: PreTrainedModel, model: ModelConfig, dtype: Any) -> PreTrainedModel:
    """`built` loaded back quantized (transformers quantizes while loading a checkpoint, not in memory)."""
    name = built.config._name_or_path
    with tempfile.TemporaryDirectory(prefix="mora-train-quantize-") as folder:
        built.save_pretrained(folder)
        del built
        quantized = _load_pretrained(folder, model, dtype)
    quantized.config._name_or_path = name  # not the temporary folder, which is gone
    return quantized


def warn_if_custom_code_unused(path: str, trust_remote_code: bool) -> None:
    """A model folder that ships its own code (`auto_map` in config.json) for a `model_type` transformers also
    knows loads without trust_remote_code: as the built-in class, which may differ from what the folder's author
    wrote. Say so, since nothing else would."""
    if trust_remote_code:
        return
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a local folder, or no readable config.json: loading reports it
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        classes = ", ".join(f"{auto} -> {target}" for auto, target in dict(config["auto_map"]).items())
        log.warning(
            "%s ships custom code (auto_map in config.json: %s), which is NOT used: model.trust_remote_code is false, "
            "so transformers loads its built-in %r class instead, and that is what trains. Add "
            "model.trust_remote_code=true to use the folder's own code "
            "(it runs that code: only if you trust its author)",
            path,
            classes,
            model_type,
        )


def _require_model_folder(path: str) -> None:
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise MoraTrainError(
            f"model.name_or_path={path} is not a model folder (no config.json); give a folder written by "
            "save_pretrained (config.json + weights), a .gguf file, or a Hugging Face Hub id"
        )
    if folder.exists() and not folder.is_dir() and not str(path).endswith(".gguf"):
        raise MoraTrainError(f"model.name_or_path={path} is a file; give a model folder, a .gguf file or a hub id")

"""OmegaConf resolvers the shipped configs use; registered when the mora_train package is imported.

Data sources (configs/task/*.yaml) read the public Hugging Face Hub datasets by default and local copies
when `data_dir` is set (`data_dir=/data` or MORA_TRAIN_DATA=/data); each source says both:

    path: ${data_file:${data_dir},gsm8k/train.jsonl}    # DATA_DIR/gsm8k/train.jsonl, or null when data_dir is null
    hub: ${hub_dataset:${data_dir},openai/gsm8k}        # openai/gsm8k, or null when data_dir is set
    hub_config: main                                    # hub_config/split/revision only matter for the hub
    split: train

and `${local_or_hub:${data_dir},LOCAL,HUB}` picks any other value (field names, prompts, labels) that differs
between the local file and the Hub copy. Overriding `path`/`hub` on the command line still works as before.

Model configs whose weights are a file: `hub_id: ${hub_id_for:${.name_or_path},FILE,ORG/NAME}` (the Hub id while
name_or_path is still that file).

Run dirs: `${mora_run_dir:DEFAULT}` (hydra.run.dir) is the user's `output_dir=...` when one is given, so Hydra's
`.hydra/` and job log land in the run dir itself, else DEFAULT (the dated outputs/ folder).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mora_train.configs import CONFIG_DIR

# The shipped default of `output_dir` (configs/config.yaml): "wherever Hydra puts the job".
HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def data_file(data_dir: str | None, relative: str) -> str | None:
    """`${data_file:${data_dir},REL}`: DATA_DIR/REL, or null (read the Hub instead) when data_dir is null."""
    if data_dir is None:
        return None
    return os.path.join(os.path.expanduser(str(data_dir)), relative)


def hub_dataset(data_dir: str | None, dataset_id: str) -> str | None:
    """`${hub_dataset:${data_dir},ORG/NAME}`: the Hub id when data_dir is null, else null (read the local file)."""
    return dataset_id if data_dir is None else None


def local_or_hub(data_dir: str | None, local: Any, hub: Any) -> Any:
    """`${local_or_hub:${data_dir},LOCAL,HUB}`: LOCAL when data_dir is set, HUB when it is null."""
    return hub if data_dir is None else local


def hub_id_for(name_or_path: str | None, shipped: str, hub_id: str) -> str | None:
    """`hub_id: ${hub_id_for:${.name_or_path},FILE,ORG/NAME}` (a model config whose weights are a local file):
    ORG/NAME while model.name_or_path is still FILE, null once it names another model, so that a run on another
    model (model.name_or_path=...) never records this one's Hub id."""
    return hub_id if name_or_path == shipped else None


def config_file(relative: str) -> str:
    """`${config_file:REL}`: a file shipped with the configs (package data), as an absolute path."""
    return str(CONFIG_DIR / relative)


def mora_run_dir(default: str, *, _root_: DictConfig) -> str:
    """`hydra.run.dir: ${mora_run_dir:DEFAULT}`: `output_dir` when the user set one, else DEFAULT.

    `output_dir` defaults to `${hydra:runtime.output_dir}` (the run dir Hydra picks), which cannot be
    resolved while Hydra is still choosing that dir; any other value is the user's and becomes the run dir.
    """
    node = _root_._get_node("output_dir") if "output_dir" in _root_ else None
    if node is None or node._value() in (None, HYDRA_OUTPUT_DIR):
        return default
    return str(_root_.output_dir)


# A file name may hold 255 bytes; Hydra's override_dirname grows with every override and keeps
# path separators of values (model.name_or_path=/a/b would nest folders).
MAX_DIRNAME = 120


def safe_dirname(override_dirname: str, max_len: int = MAX_DIRNAME) -> str:
    """`${mora_dirname:...}` (hydra.sweep.subdir): a job folder name from Hydra's override_dirname, no '/', at
    most max_len characters. Long names are cut and end in a hash of the whole, so two jobs never share a folder.
    """
    name = str(override_dirname).replace("/", "_").replace("\\", "_") or "defaults"
    if len(name) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: max_len - 9]}-{digest}"
    return name


RESOLVERS: dict[str, Callable[..., Any]] = {
    "data_file": data_file,
    "hub_dataset": hub_dataset,
    "local_or_hub": local_or_hub,
    "hub_id_for": hub_id_for,
    "config_file": config_file,
    "mora_run_dir": mora_run_dir,
    "mora_dirname": safe_dirname,
}


def register_resolvers() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)

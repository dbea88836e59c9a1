"""The shipped Hydra configs (package data): the defaults list in config.yaml and one folder per config group.

Hydra finds them as `pkg://mora_train.configs`, so they work from a wheel install in any directory.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def base_model_config(base_model: str):  # -> omegaconf.DictConfig
    """A `model` config from a shipped config name (configs/model/NAME.yaml) or a Hub id / local folder / .gguf
    file (the default model config's other settings, no package) — for commands that take `--base-model`."""
    from omegaconf import OmegaConf

    named = CONFIG_DIR / "model" / f"{base_model}.yaml"
    if named.is_file():
        return OmegaConf.load(named)
    default = OmegaConf.load(CONFIG_DIR / "model" / "smollm2-135m.yaml")
    return OmegaConf.merge(default, {"name_or_path": base_model, "package": None})

"""mora-train: fine-tune causal language models with MoRA, LoRA or full fine-tuning."""

from __future__ import annotations

from mora_train.config.quiet import quiet_optional_packages as _quiet_optional_packages
from mora_train.config.resolvers import register_resolvers as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()  # ${data_file:...}, ${hub_dataset:...}, ${mora_run_dir:...} in configs/*.yaml
_quiet_optional_packages()  # before anything imports transformers, which imports them

__all__ = ["__version__", "load_adapter"]


def load_adapter(model, adapter_dir):
    """Attach a saved mora-train adapter (``RUN_DIR/adapter``) to a base model; see adapters.load_adapter."""
    from mora_train.adapters import load_adapter as _load_adapter

    return _load_adapter(model, adapter_dir)

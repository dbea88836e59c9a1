"""MoRA, one square matrix between a compression and a decompression (arXiv 2405.12130).

Read in this order: types.py (type names, each type's operator pair, r̂, the refused shapes), operators.py
(each compression and decompression with its adjoint), branch.py (a pair composed with M, its autograd),
layer.py (MoRALinear, the module), config.py (adapter=mora's keys), adapter.py (MoRA on a whole model) and
official.py (folders written by the official MoRA fork of peft).
"""

from mora_train.adapters.mora.adapter import MoraAdapter
from mora_train.adapters.mora.config import MoraSettings
from mora_train.adapters.mora.layer import MoRALinear

__all__ = ["MoRALinear", "MoraAdapter", "MoraSettings"]

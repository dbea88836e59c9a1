"""The plain-peft check of an exported LoRA folder: a separate Python process that never imports mora_train loads
the base model and the folder with peft alone, and its logits are compared with the adapted model's."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_text_atomically
from mora_train.export.probe import random_probe_ids

# Run in a fresh interpreter: proves the folder needs nothing but torch, transformers and peft. argv[5] is
# model.trust_remote_code, always given: left unset, transformers asks on stdin before running custom code.
PEFT_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=sys.argv[5] == "1")
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert not any(name.startswith("mora_train") for name in sys.modules), "mora_train was imported"
torch.save(logits, sys.argv[4])
"""

PEFT_CHECK_LOG = "peft_check_stderr.log"  # in the export folder when the plain-peft check fails


def check_with_peft(
    base: PreTrainedModel, folder: Path, reference: nn.Module, trust_remote_code: bool = False
) -> float:
    """Max |logit difference| between `reference` and plain peft's base + exported folder (other process)."""
    ids = random_probe_ids(base.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory(prefix="mora-export-check-") as tmp_name:
        tmp = Path(tmp_name)
        base.save_pretrained(tmp / "base")
        torch.save(ids, tmp / "ids.pt")
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                PEFT_CHECK,
                str(tmp / "base"),
                str(folder),
                str(tmp / "ids.pt"),
                str(tmp / "out.pt"),
                "1" if trust_remote_code else "0",
            ],
            capture_output=True,
            check=False,  # a failure is read from its stderr below
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            log_path = Path(folder) / PEFT_CHECK_LOG
            write_text_atomically(log_path, done.stderr)
            raise MoraTrainError(
                f"plain peft could not load the exported folder {folder}: {_last_error_line(done.stderr)} "
                f"(its whole output: {log_path})"
            )
        got = torch.load(tmp / "out.pt")
    return float((got.float() - expected).abs().max())


def _last_error_line(stderr: str, limit: int = 400) -> str:
    """A Python traceback's final exception (its message's lines joined into one), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for start in range(len(lines) - 1, -1, -1):
        name = lines[start].split(":", 1)[0]
        if ":" in lines[start] and " " not in name and name.endswith(("Error", "Exception")):
            text = " ".join(lines[start:])
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return lines[-1] if lines else "no output"

"""Packed rows on the device: per-token losses equal the unpacked ones for sdpa (float32) and, where flash-attn is
installed on a CUDA machine, for flash_attention_2 (bfloat16, its rows flattened into one as the Trainer's
collator does), and the packing check passes both. The CPU tests (tests/unit/test_packing.py) cover eager and
sdpa in float64/float32; flash attention exists only here."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mora_train.data.common import PadCollator
from mora_train.models.attention import flattens_packed_rows, packing_problem
from tests.gpu.conftest import ON_CUDA, record
from tests.unit.test_packing import packed_losses_by_example, synthetic_examples, tiny_model, token_losses

pytestmark = pytest.mark.gpu

CASES = [
    pytest.param("sdpa", torch.float32, 1e-4, id="sdpa-fp32"),
    pytest.param("flash_attention_2", torch.bfloat16, 5e-2, id="flash_attention_2-bf16"),
]


@pytest.mark.parametrize("implementation,dtype,tolerance", CASES)
def test_packed_losses_equal_unpacked_on_the_device(
    device: torch.device, implementation: str, dtype: torch.dtype, tolerance: float
) -> None:
    if implementation == "flash_attention_2" and not (ON_CUDA and importlib.util.find_spec("flash_attn")):
        pytest.skip("flash_attention_2 needs a CUDA GPU and the flash-attn package")
    model = tiny_model(implementation, dtype).to(device)
    assert packing_problem(model) is None
    flatten = flattens_packed_rows(model)
    assert flatten == (implementation == "flash_attention_2")
    examples = synthetic_examples(12, seed=1)

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    alone = [token_losses(model, on_device(PadCollator(0)([e])))[0].cpu() for e in examples]
    packed = packed_losses_by_example(model, examples, max_seq_len=32, flatten=flatten, prepare=on_device)
    worst = 0.0
    for i in range(len(examples)):
        learned = ~torch.isnan(alone[i])
        assert torch.equal(learned, ~torch.isnan(packed[i].cpu()))
        worst = max(worst, float((packed[i].cpu()[learned] - alone[i][learned]).abs().max()))
    record("packing", implementation=implementation, dtype=str(dtype), max_abs_diff=worst, tolerance=tolerance)
    assert worst <= tolerance

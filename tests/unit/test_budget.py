"""`rank` means the LoRA rank; MoRA trains (almost) the same number of parameters."""

from __future__ import annotations

import pytest

from mora_train.adapters.mora.layer import mora_square_side

# SmolLM2-135M's projections (d_in, d_out) per layer; Llama-2-7B's for the paper's setting.
SMOLLM2 = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
LLAMA2_7B = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]


@pytest.mark.parametrize("shapes", [SMOLLM2, LLAMA2_7B], ids=["smollm2", "llama2-7b"])
@pytest.mark.parametrize("rank", [8, 32, 128, 256])
@pytest.mark.parametrize("mora_type", ["sharing", "rope"])
def test_mora_and_lora_budgets_agree_within_2_percent(shapes, rank: int, mora_type: str) -> None:
    lora = sum(rank * (d_in + d_out) for d_in, d_out in shapes)
    mora = sum(mora_square_side(d_in, d_out, rank, mora_type) ** 2 for d_in, d_out in shapes)
    assert abs(mora - lora) / lora <= 0.02


def test_square_side_formula() -> None:
    assert mora_square_side(576, 576, 8, "sharing") == 96  # sqrt(1152 * 8) = 96
    assert mora_square_side(4096, 4096, 8, "sharing") == 256
    assert mora_square_side(576, 1536, 256, "sharing") == 735  # floor(sqrt(2112 * 256) + 0.5)
    assert mora_square_side(576, 1536, 256, "rope") == 734  # rounded down to even

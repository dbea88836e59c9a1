"""Fuzz family for the quantized export: random quantization x adapter x 4-bit layout x eval forward before the
export x reference x quantization options, on the tiny Llama, as on a CPU with AVX512-BF16 (simulated, see
tests/support/quantized.py).

The property: the export never passes with a merged checkpoint that is not the trained model. Measured against
the saved adapter re-attached to a freshly loaded quantized base (its quantized kernels), merged/ either
  * passes, and is that model within the kernel check's tolerance plus the merge rounding, or
  * was exported from a base repacked behind the run's back (bfloat16 block scales): then it is that base's
    model (within bfloat16 rounding of the trained one), and a float32 run checked against the rebuild fails
    loudly, naming both numbers;
and a base in the plain layout always passes. The default run draws a handful of examples (FAST);
`pytest -m slow` runs the long profile.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from mora_train.adapters import load_adapter
from mora_train.export import export_merged, logits_of, quantized_logits
from tests.support.quantized import (
    ADAPTERS,
    eval_forward,
    load_base,
    machine_with_avx512bf16,
    probe_batch,
    repack_like_the_cpu_kernel,
    save_adapter,
    trained_adapter,
)

pytest.importorskip("bitsandbytes")

FAST, LONG = 4, 40
BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]

EXPORTS = st.fixed_dictionaries(
    {
        "quantization": st.sampled_from(["nf4", "fp4", "int8"]),
        "adapter": st.sampled_from(sorted(ADAPTERS)),
        "repacked": st.booleans(),
        "eval_forward": st.booleans(),
        "reference": st.sampled_from(["rebuild", "live"]),
        "double_quant": st.booleans(),
        "compute_dtype": st.sampled_from(["float32", "bfloat16"]),
    }
)


def check_export(case: dict, folder: Path) -> None:
    options = (
        f"model.quantization_options.double_quant={str(case['double_quant']).lower()}",
        f"model.quantization_options.compute_dtype={case['compute_dtype']}",
    )
    adapter, tokenizer = trained_adapter(case["quantization"], case["adapter"], steps=2, options=options)
    adapter_dir = save_adapter(adapter, folder / "adapter")
    rebuilt = quantized_logits(
        load_adapter(load_base(case["quantization"], *options), adapter_dir).model, probe_batch()
    )
    repacked = case["repacked"] and repack_like_the_cpu_kernel(adapter.model) > 0  # int8 has no 4-bit layer
    if case["eval_forward"]:
        eval_forward(adapter.model)
    result = export_merged(
        adapter,
        tokenizer,
        probe_batch(),
        folder / "merged",
        quantized_reference=rebuilt if case["reference"] == "rebuild" else None,
    )
    merged = AutoModelForCausalLM.from_pretrained(str(folder / "merged"), dtype=torch.float32)
    gap = float((logits_of(merged, probe_batch()) - rebuilt).abs().max())
    scale = max(float(rebuilt.abs().max()), 1.0)
    # The merged checkpoint is written in the compute dtype: a bfloat16 one rounds every weight once more.
    rounding = (1e-4 if case["compute_dtype"] == "float32" else 2**-5) * scale
    if not repacked:
        assert result.passed, result.failure_message(adapter_dir)
        assert gap <= result.quantized_kernel_tolerance + rounding, (case, gap)
        return
    assert gap <= 2**-7 * scale + rounding, (case, gap)  # bf16 scales, never a misread layout (~1 x scale)
    if case["compute_dtype"] == "float32" and case["reference"] == "rebuild":
        assert not result.passed, (case, gap)
        message = result.failure_message(adapter_dir)
        assert (
            f"{result.quantized_kernel_diff:.3g}" in message and f"{result.quantized_kernel_tolerance:.3g}" in message
        )


@pytest.mark.parametrize("budget", BUDGETS)
def test_quantized_exports_are_the_trained_model_or_fail_loudly(budget: int, tmp_path: Path, monkeypatch) -> None:
    machine_with_avx512bf16(monkeypatch)
    cases = []

    @settings(
        max_examples=budget,
        deadline=None,
        database=None,
        derandomize=budget == FAST,
        suppress_health_check=list(HealthCheck),
    )
    @given(EXPORTS)
    def property_holds(case: dict) -> None:
        cases.append(case)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*inputs will be cast.*")  # bitsandbytes' int8 CPU path
            check_export(case, tmp_path / f"case-{len(cases)}")

    property_holds()
    print(f"\nfuzz quantized export: {len(cases)} cases")

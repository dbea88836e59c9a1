"""Every MoRA type on the device, fp32 / bf16, against the CPU float64 reference.

The reference is the same layer in float64 on CPU (its forward and `delta_weight()` are checked against a
naive loop-based reading of the operator table in tests/unit/test_mora_layer.py). On the device:

* forward  y = x W^T + b + delta(x), and the gradients of sum(y * g) w.r.t. x and M;
* `delta_weight()` computed on the device;
* merge: the merged layer's forward equals the unmerged one.

Precisions and tolerances (relative: max |got - ref| / max |ref|, over the whole tensor):

| precision | what runs | forward, grad x, grad M | delta_weight |
|---|---|---|---|
| fp32 | fp32 weights, TF32 off | 1e-5 | 1e-6 |
| bf16-autocast | fp32 weights under torch.autocast(bf16): the trainer's precision=bf16 | 3e-2 | 1e-6 (fp32 math) |
| bf16-weights | bf16 weights and inputs (model.dtype=bfloat16) | 3e-2 | 1e-6 vs the bf16-rounded M |

bf16 keeps 8 significant bits (relative spacing 2^-8 = 3.9e-3); a matmul rounds its inputs and its output once
each, so a few spacings is the honest bound; 3e-2 also catches a wrong operator (errors of order 1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mora_train.adapters.mora.layer import MORA_TYPES, MoRALinear, mora_shape_problem
from tests.gpu.conftest import ON_CUDA, record

pytestmark = pytest.mark.gpu

# (d_in, d_out, rank): square, GQA-like, non-multiples of r_hat; on CUDA also llama-1b's layers (hidden 2048,
# SwiGLU 5461) at r=8 and r=256.
SHAPES = [(64, 64, 8), (100, 37, 4), (576, 192, 8)]
if ON_CUDA:
    SHAPES += [(2048, 2048, 8), (2048, 5461, 8), (5461, 2048, 256)]
TOKENS = 256 if ON_CUDA else 16
PRECISIONS = {"fp32": 1e-5, "bf16-autocast": 3e-2, "bf16-weights": 3e-2}
CASES = [
    pytest.param(shape, kind, id=f"{kind}-{shape[0]}x{shape[1]}-r{shape[2]}")
    for shape in SHAPES
    for kind in MORA_TYPES
    if mora_shape_problem("x", *shape, kind) is None
]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def reference_layer(d_in: int, d_out: int, rank: int, kind: str) -> MoRALinear:
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(d_in, d_out, dtype=torch.float64), rank, kind, layer_name="blk.proj")
    with torch.no_grad():
        # Perturb the zero init so delta is of the same order as W x.
        layer.mora_M.normal_(std=(1.0 / layer.r_hat) ** 0.5)
    return layer


def forward_backward(layer: MoRALinear, x: torch.Tensor, g: torch.Tensor, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    layer.mora_M.grad = None
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * g.float()).sum().backward()
    return y, x.grad, layer.mora_M.grad


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("shape,kind", CASES)
def test_forward_backward_and_delta_weight_match_float64_reference(
    shape: tuple[int, int, int], kind: str, precision: str, device: torch.device
) -> None:
    d_in, d_out, rank = shape
    ref = reference_layer(d_in, d_out, rank, kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, d_in, dtype=torch.float64, generator=gen)
    g = torch.randn(TOKENS, d_out, dtype=torch.float64, generator=gen)

    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    layer = copy.deepcopy(ref).to(device=device, dtype=dtype)
    if dtype != torch.float64:
        # The reference sees exactly the weights and inputs the device layer sees (rounded to its dtype).
        ref.load_state_dict({k: v.to(dtype).double().cpu() for k, v in layer.state_dict().items()})
        x, g = x.to(dtype).double(), g.to(dtype).double()
    y_ref, gx_ref, gM_ref = forward_backward(ref, x, g, autocast=False)
    y, gx, gM = forward_backward(layer, x.to(device, dtype), g.to(device, dtype), autocast=precision == "bf16-autocast")

    tol = PRECISIONS[precision]
    errors = {
        "forward": relative_error(y, y_ref),
        "grad_x": relative_error(gx, gx_ref),
        "grad_M": relative_error(gM, gM_ref),
        "delta_weight": relative_error(layer.delta_weight(), ref.delta_weight()),
    }
    merged = copy.deepcopy(layer)
    merged.merge()
    with (
        torch.no_grad(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"),
    ):
        errors["merged_forward"] = relative_error(merged(x.to(device, dtype)), y_ref)
    record("mora_layer", type=kind, shape=list(shape), precision=precision, tolerance=tol, **errors)
    assert layer.delta_weight().device.type == device.type
    for name, error in errors.items():
        limit = 1e-6 if name == "delta_weight" else tol
        assert error <= limit, f"{name}: relative error {error:.2e} > {limit:.0e} ({kind}, {shape}, {precision})"

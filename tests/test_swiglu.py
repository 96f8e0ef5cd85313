"""Fused SwiGLU kernel vs the reference: forward, d_gate and d_up, under the interpreter on CPU."""

import pytest
import torch
from kernel_check import check_op

import kernels
from kernels import reference

# This module's non-`gpu` tests run Triton on CPU tensors, which needs the interpreter (see conftest.py).
pytestmark = pytest.mark.interpreter


def _triton(gate, up):
    return kernels.swiglu(gate, up, impl="triton")


CASES = [
    ((2, 17, 704), torch.float32),
    ((1, 130, 5632), torch.float16),
    ((1, 1, 1), torch.float32),
    ((257, 33), torch.float16),
    ((3, 257, 1536), torch.float32),
]


@pytest.mark.parametrize("shape, dtype", CASES)
def test_swiglu_matches_reference(shape, dtype):
    # Wide gate values reach both tails of the sigmoid.
    gate = torch.randn(shape, dtype=dtype) * 4
    up = torch.randn(shape, dtype=dtype)
    check_op(_triton, reference.swiglu_ref, [gate, up], ["gate", "up"], [True, True])


def test_swiglu_non_contiguous_inputs():
    """gate and up as halves of one fused projection."""
    fused = torch.randn(2, 17, 2 * 96)
    gate, up = fused[..., :96], fused[..., 96:]
    check_op(_triton, reference.swiglu_ref, [gate, up], ["gate", "up"], [True, True])


def test_swiglu_does_not_modify_inputs():
    gate, up = torch.randn(4, 40), torch.randn(4, 40)
    gate0, up0 = gate.clone(), up.clone()
    out = kernels.swiglu(gate.requires_grad_(), up.requires_grad_(), impl="triton")
    out.sum().backward()
    assert torch.equal(gate.detach(), gate0) and torch.equal(up.detach(), up0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu_gpu(dtype):
    for shape, _ in CASES + [((8, 2048, 5632), None)]:
        gate = torch.randn(shape, dtype=dtype, device="cuda") * 4
        up = torch.randn(shape, dtype=dtype, device="cuda")
        check_op(_triton, reference.swiglu_ref, [gate, up], ["gate", "up"], [True, True])

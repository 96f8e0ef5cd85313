"""Rotary embedding kernel vs the reference: forward and dX (rotation by -angle), under the interpreter on CPU."""

import pytest
import torch
from kernel_check import check_op

import kernels
from kernels import reference

# This module's non-`gpu` tests run Triton on CPU tensors, which needs the interpreter (see conftest.py).
pytestmark = pytest.mark.interpreter


def _cos_sin(t: int, d: int, start: int = 0, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables of shape (T, D // 2) for positions start .. start + T - 1 (start > 0: decoding with a cache)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(start, start + t, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _triton(x, cos, sin):
    return kernels.apply_rotary(x, cos, sin, impl="triton")


# (B, T, H, D, start position, dtype)
CASES = [
    (2, 17, 4, 64, 0, torch.float32),
    (1, 257, 8, 128, 0, torch.float16),
    (1, 1, 1, 32, 300, torch.float32),  # one decoding step at position 300
    (3, 130, 2, 16, 7, torch.float16),
    (1, 17, 16, 80, 0, torch.float32),  # D // 2 = 40 is not a power of two
]


@pytest.mark.parametrize("b, t, h, d, start, dtype", CASES)
def test_rotary_matches_reference(b, t, h, d, start, dtype):
    x = torch.randn(b, t, h, d, dtype=dtype)
    cos, sin = _cos_sin(t, d, start)
    check_op(_triton, reference.rotary_ref, [x, cos, sin], ["x", "cos", "sin"], [True, False, False])


def test_rotary_strided_view_not_in_place():
    """x as a view of a fused projection: read in place, never written."""
    b, t, h, d = 2, 17, 4, 32
    fused = torch.randn(b, t, 3 * h * d)
    x = fused[..., h * d : 2 * h * d].view(b, t, h, d)
    before = fused.clone()
    cos, sin = _cos_sin(t, d)
    check_op(_triton, reference.rotary_ref, [x, cos, sin], ["x", "cos", "sin"], [True, False, False])
    out = _triton(x, cos, sin)
    assert torch.equal(fused, before)
    assert out.data_ptr() != x.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary_gpu(dtype):
    for b, t, h, d, start, _ in CASES + [(4, 4096, 16, 128, 0, None)]:
        x = torch.randn(b, t, h, d, dtype=dtype, device="cuda")
        cos, sin = (c.cuda() for c in _cos_sin(t, d, start))
        check_op(_triton, reference.rotary_ref, [x, cos, sin], ["x", "cos", "sin"], [True, False, False])

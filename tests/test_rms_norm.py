"""Fused RMSNorm kernel vs the reference: forward, dX and dW (fp32 partials), under the interpreter on CPU."""

import pytest
import torch
from kernel_check import check_op

import kernels
from kernels import reference

# This module's non-`gpu` tests run Triton on CPU tensors, which needs the interpreter (see conftest.py).
pytestmark = pytest.mark.interpreter


def _triton(eps):
    return lambda x, w: kernels.rms_norm(x, w, eps, impl="triton")


def _ref(eps):
    return lambda x, w: reference.rms_norm_ref(x, w, eps)


# (shape of x, x dtype, weight dtype, eps): hidden sizes that are and are not powers of two, one row and many
# (several backward programs, so dW is reduced from several partials), mixed fp16 activations with fp32 weights.
CASES = [
    ((2, 17, 32), torch.float32, torch.float32, 1e-6),
    ((1, 130, 1000), torch.float16, torch.float16, 1e-5),
    ((3, 1, 2048), torch.float32, torch.float32, 1e-5),
    ((257, 64), torch.float16, torch.float32, 1e-6),
    ((2, 130, 5632), torch.float32, torch.float32, 1e-5),
    ((4, 33, 1), torch.float32, torch.float32, 1e-5),
    ((1, 17, 2, 96), torch.float16, torch.float16, 1e-6),
]


@pytest.mark.parametrize("shape, dtype, w_dtype, eps", CASES)
def test_rms_norm_matches_reference(shape, dtype, w_dtype, eps):
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    w = (1 + 0.5 * torch.randn(shape[-1])).to(w_dtype)
    check_op(_triton(eps), _ref(eps), [x, w], ["x", "w"], [True, True])


def test_rms_norm_strided_rows():
    """Rows with a stride larger than the hidden size (a slice of a wider tensor) are read in place."""
    x = torch.randn(2, 17, 96)[..., :64]
    w = torch.randn(64)
    check_op(_triton(1e-5), _ref(1e-5), [x, w], ["x", "w"], [True, True])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_gpu(dtype):
    for shape, _, _, eps in CASES:
        x = torch.randn(shape, dtype=dtype, device="cuda")
        w = torch.randn(shape[-1], dtype=dtype, device="cuda")
        check_op(_triton(eps), _ref(eps), [x, w], ["x", "w"], [True, True])


@pytest.mark.gpu
def test_rms_norm_backward_is_deterministic_gpu():
    x = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    first = None
    for _ in range(10):
        grads = torch.autograd.grad(kernels.rms_norm(x, w, 1e-5, impl="triton"), (x, w), dy)
        first = first or grads
        assert torch.equal(grads[0], first[0]) and torch.equal(grads[1], first[1])

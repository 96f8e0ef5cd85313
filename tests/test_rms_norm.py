"""Fused RMSNorm kernel vs the reference: forward, dX and dW (fp32 partials), under the interpreter on CPU."""

import pytest
import torch
from kernel_check import assert_rule, check_op, poisoned_outputs

import kernels
from kernels import reference
from kernels.rms_norm import LAYOUTS, rms_norm_fwd

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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 40), (5, 1000), (2, 2048), (33, 8)])
def test_both_forward_layouts(layout, shape):
    """Each forward grid layout (one row per program, or a tile of rows), with and without the residual add."""
    x, res = torch.randn(shape), torch.randn(shape)
    w = 1 + 0.5 * torch.randn(shape[-1])
    for residual in (None, res):
        s = x if residual is None else x + residual
        y, rstd, s_out = rms_norm_fwd(x, w, 1e-5, residual, layout=layout)
        ref = reference.rms_norm_ref(s.double(), w.double(), 1e-5)
        assert_rule("y", y, ref, reference.rms_norm_ref(s, w, 1e-5))
        torch.testing.assert_close(rstd, s.double().pow(2).mean(-1).add(1e-5).rsqrt().float())
        assert torch.equal(s_out, s)


def _add_triton(eps):
    return lambda x, r, w: kernels.add_rms_norm(x, r, w, eps, impl="triton")


def _add_ref(eps):
    return lambda x, r, w: reference.add_rms_norm_ref(x, r, w, eps)


@pytest.mark.parametrize("shape, dtype, w_dtype, eps", CASES)
def test_add_rms_norm_matches_reference(shape, dtype, w_dtype, eps):
    """Both outputs (normed, sum) and the gradients of x, residual and weight, each output with its own random
    upstream gradient."""
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    r = torch.randn(shape, dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(w_dtype)
    _check_two_outputs(_add_triton(eps), _add_ref(eps), [x, r, w], ["x", "residual", "w"])


def _check_two_outputs(kernel, ref_fn, inputs, names):
    """check_op for an op with two outputs: the rule on each output and on every input's gradient."""
    runs = {}
    for kind in ("kernel", "same", "ref"):
        args = [t.detach().to(torch.float64 if kind == "ref" else t.dtype).requires_grad_() for t in inputs]
        if kind == "kernel":
            with poisoned_outputs():
                outs = kernel(*args)
        else:
            outs = ref_fn(*args)
        runs[kind] = (args, outs)
    dys = [torch.randn_like(o) for o in runs["same"][1]]
    for kind, (args, outs) in runs.items():
        with poisoned_outputs():
            grads = torch.autograd.grad(outs, args, [dy.to(o.dtype) for dy, o in zip(dys, outs, strict=True)])
        runs[kind] = (outs, grads)
    for i, out in enumerate(runs["kernel"][0]):
        assert_rule(f"out{i}", out, runs["ref"][0][i], runs["same"][0][i])
    for name, g, g_ref, g_same in zip(names, runs["kernel"][1], runs["ref"][1], runs["same"][1], strict=True):
        assert_rule(f"d{name}", g, g_ref, g_same)


def test_add_rms_norm_with_the_sum_unused():
    """Only the normed output used downstream (the last block): the sum's gradient is taken as zero."""
    x, r, w = torch.randn(2, 9, 64), torch.randn(2, 9, 64), torch.randn(64)
    check_op(lambda x, r, w: _add_triton(1e-5)(x, r, w)[0], lambda x, r, w: _add_ref(1e-5)(x, r, w)[0],
             [x, r, w], ["x", "residual", "w"], [True, True, True])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_rms_norm_gpu(dtype):
    for shape, _, _, eps in CASES + [((16384, 2048), None, None, 1e-5)]:
        x, r = torch.randn(shape, dtype=dtype, device="cuda"), torch.randn(shape, dtype=dtype, device="cuda")
        w = torch.randn(shape[-1], dtype=dtype, device="cuda")
        _check_two_outputs(_add_triton(eps), _add_ref(eps), [x, r, w], ["x", "residual", "w"])


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

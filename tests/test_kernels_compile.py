"""torch.library registration: the custom ops pass opcheck, and torch.compile traces the kernels without graph
breaks (aot_eager on CPU under the interpreter; Inductor with fullgraph=True on a GPU)."""

import pytest
import torch
from kernel_check import assert_rule

import kernels

# This module's non-`gpu` tests run Triton on CPU tensors, which needs the interpreter (see conftest.py).
pytestmark = pytest.mark.interpreter


def _block(x, w, gate_w, up_w, cos, sin, impl):
    """A miniature transformer block through every kernel: norm, rotary, GQA attention, SwiGLU."""
    b, t, d = x.shape
    h = kernels.rms_norm(x, w, 1e-5, impl=impl)
    q = kernels.apply_rotary(h.view(b, t, 2, d // 2), cos, sin, impl=impl)
    k = kernels.apply_rotary(h[..., : d // 2].reshape(b, t, 1, d // 2), cos, sin, impl=impl)
    a = kernels.flash_attn_func(q, k, k, causal=True, impl=impl).reshape(b, t, d)
    return kernels.swiglu(a @ gate_w, a @ up_w, impl=impl)


def _inputs(device="cpu", dtype=torch.float32, b=2, t=19, d=64, f=96):
    x = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
    gate_w = (torch.randn(d, f, device=device, dtype=dtype) / 8).requires_grad_()
    up_w = (torch.randn(d, f, device=device, dtype=dtype) / 8).requires_grad_()
    angles = torch.rand(t, d // 4, device=device) * 6
    return x, w, gate_w, up_w, angles.cos(), angles.sin()


def test_custom_ops_are_registered():
    for name in ("flash_attn_fwd", "flash_attn_bwd", "rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd",
                 "rotary_fwd", "rotary_bwd"):
        assert hasattr(torch.ops.geb, name)


def test_opcheck_forward_ops():
    """Schema, fake (meta) implementations and dispatch of the forward custom ops, run eagerly on CPU."""
    q, k = torch.randn(1, 17, 2, 32), torch.randn(1, 20, 1, 32)
    torch.library.opcheck(torch.ops.geb.flash_attn_fwd, (q, k, k, True, 0.2))
    torch.library.opcheck(torch.ops.geb.rms_norm_fwd, (torch.randn(3, 40), torch.randn(40), 1e-5))
    torch.library.opcheck(torch.ops.geb.swiglu_fwd, (torch.randn(3, 40), torch.randn(3, 40)))
    angles = torch.rand(17, 16)
    torch.library.opcheck(torch.ops.geb.rotary_fwd, (torch.randn(2, 17, 3, 32), angles.cos(), angles.sin()))


def test_compile_fullgraph_traces_kernels_on_cpu():
    """Dynamo + AOTAutograd trace forward and backward through the autograd.Functions and custom ops with no graph
    break; the compiled graph runs the Triton kernels (interpreter) and matches eager."""
    torch._dynamo.reset()
    inputs = _inputs()
    eager = _block(*inputs, impl="triton")
    grads_eager = torch.autograd.grad(eager.sum(), inputs[:4])
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs, impl="triton")
    grads = torch.autograd.grad(out.sum(), inputs[:4])
    torch.testing.assert_close(out, eager)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_inductor_gpu(dtype):
    torch._dynamo.reset()
    inputs = _inputs("cuda", dtype, b=2, t=300, d=256, f=512)
    out = torch.compile(_block, fullgraph=True)(*inputs, impl="triton")
    grads = torch.autograd.grad(out.float().sum(), inputs[:4])
    # Ground truth in fp64, and PyTorch in the same dtype, both eager.
    runs = {}
    for kind, cast in (("ref", torch.float64), ("same", dtype)):
        args = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in inputs[:4]] + list(inputs[4:])
        y = _block(*args, impl="torch")
        runs[kind] = (y, torch.autograd.grad(y.float().sum(), args[:4]))
    # Several kernels in a row: allow 4x PyTorch's own error.
    assert_rule("out", out, runs["ref"][0], runs["same"][0], factor=4.0)
    for name, g, g_ref, g_same in zip(("dx", "dw", "dgate_w", "dup_w"), grads, runs["ref"][1], runs["same"][1],
                                      strict=True):
        assert_rule(name, g, g_ref, g_same, factor=4.0)


def test_reference_block_matches_triton_block():
    """Sanity check of the helper above: both paths agree in eager mode."""
    inputs = _inputs(t=9)
    torch.testing.assert_close(_block(*inputs, impl="triton"), _block(*inputs, impl="torch"), atol=1e-5, rtol=1e-4)

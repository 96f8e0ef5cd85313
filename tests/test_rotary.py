"""Rotary embedding kernel vs the reference: forward and dX (rotation by -angle), under the interpreter on CPU."""

import pytest
import torch
from kernel_check import assert_rule, check_op, poisoned_outputs

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


def _qk_triton(q, k, cos, sin):
    return kernels.apply_rotary_qk(q, k, cos, sin, impl="triton")


def _qk_check(q, k, cos, sin):
    """The rule on both outputs and on dq, dk, each output with its own random upstream gradient."""
    runs = {}
    for kind, fn in (("kernel", _qk_triton), ("same", reference.rotary_qk_ref), ("ref", reference.rotary_qk_ref)):
        cast = (lambda t: t.double()) if kind == "ref" else (lambda t: t)
        q_l, k_l = cast(q).detach().requires_grad_(), cast(k).detach().requires_grad_()
        with poisoned_outputs():
            runs[kind] = [q_l, k_l, fn(q_l, k_l, cast(cos), cast(sin))]
    dys = [torch.randn_like(o) for o in runs["same"][2]]
    for kind, (q_l, k_l, outs) in runs.items():
        with poisoned_outputs():
            grads = torch.autograd.grad(outs, (q_l, k_l), [dy.to(o.dtype) for dy, o in zip(dys, outs, strict=True)])
        runs[kind] = (outs, grads)
    for name, i in (("q", 0), ("k", 1)):
        assert_rule(f"{name} out", runs["kernel"][0][i], runs["ref"][0][i], runs["same"][0][i])
        assert_rule(f"d{name}", runs["kernel"][1][i], runs["ref"][1][i], runs["same"][1][i])


# (B, T, Hq, Hk, D, per-token tables, dtype)
QK_CASES = [
    (2, 17, 4, 2, 64, False, torch.float32),
    (1, 130, 8, 1, 128, False, torch.float16),
    (3, 9, 2, 2, 80, True, torch.float32),  # D // 2 = 40, not a power of two
    (2, 33, 16, 4, 32, True, torch.float16),
    (1, 1, 4, 2, 16, False, torch.float32),
]


@pytest.mark.parametrize("b, t, h_q, h_k, d, per_token, dtype", QK_CASES)
def test_rotary_qk_matches_reference(b, t, h_q, h_k, d, per_token, dtype):
    """cos/sin shared (T, D/2), or per token (B, T, D/2) with positions restarting inside a sequence (packed
    documents)."""
    q, k = torch.randn(b, t, h_q, d, dtype=dtype), torch.randn(b, t, h_k, d, dtype=dtype)
    if per_token:
        positions = torch.stack([torch.arange(t) % (i + 5) for i in range(b)])  # documents of i + 5 tokens
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = positions.float()[..., None] * inv_freq
        cos, sin = angles.cos(), angles.sin()
    else:
        cos, sin = _cos_sin(t, d, start=3)
    _qk_check(q, k, cos, sin)


def test_rotary_qk_reads_views_of_a_fused_projection():
    b, t, h, d = 2, 17, 4, 32
    fused = torch.randn(b, t, 3 * h * d)
    q, k = fused[..., : h * d].view(b, t, h, d), fused[..., h * d : 2 * h * d].view(b, t, h, d)
    before = fused.clone()
    _qk_check(q, k, *_cos_sin(t, d))
    assert torch.equal(fused, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary_qk_gpu(dtype):
    for b, t, h_q, h_k, d, _, _ in QK_CASES + [(4, 2048, 16, 4, 128, False, None)]:
        q = torch.randn(b, t, h_q, d, dtype=dtype, device="cuda")
        k = torch.randn(b, t, h_k, d, dtype=dtype, device="cuda")
        _qk_check(q, k, *(c.cuda() for c in _cos_sin(t, d)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary_gpu(dtype):
    for b, t, h, d, start, _ in CASES + [(4, 4096, 16, 128, 0, None)]:
        x = torch.randn(b, t, h, d, dtype=dtype, device="cuda")
        cos, sin = (c.cuda() for c in _cos_sin(t, d, start))
        check_op(_triton, reference.rotary_ref, [x, cos, sin], ["x", "cos", "sin"], [True, False, False])

"""FlashAttention-2 kernel vs the SDPA reference: forward, dQ, dK, dV, under the interpreter on CPU."""

import pytest
import torch
from kernel_check import assert_rule, check_op, poisoned_outputs

import kernels
from kernels import reference

# This module's non-`gpu` tests run Triton on CPU tensors, which needs the interpreter (see conftest.py).
pytestmark = pytest.mark.interpreter


def _triton(causal, scale):
    return lambda q, k, v: kernels.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale, impl="triton")


def _ref(causal, scale):
    return lambda q, k, v: reference.attention_ref(q, k, v, causal, scale)


# (B, Tq, Tk, Hq, Hkv, D, causal, dtype): every T in {1, 17, 130, 257}, D in {32, 64, 128}, group size in
# {1, 2, 4, 8}, causal and not, Tq < Tk, B > 1, fp32 and fp16, without the full cartesian product.
CASES = [
    (2, 17, 17, 4, 2, 32, True, torch.float32),
    (1, 130, 130, 8, 8, 64, True, torch.float32),
    (1, 257, 257, 2, 1, 128, True, torch.float16),
    (2, 1, 1, 1, 1, 32, False, torch.float32),
    (1, 17, 130, 4, 1, 64, True, torch.float32),  # Tq < Tk, causal: bottom-right alignment, MQA
    (1, 1, 257, 8, 1, 128, True, torch.float16),  # one decoding step over a long cache, group of 8
    (2, 130, 257, 4, 2, 32, False, torch.float16),  # Tq < Tk, non-causal
    (1, 130, 130, 4, 1, 64, True, torch.float16),
    (2, 17, 257, 2, 2, 128, False, torch.float32),
    (1, 33, 33, 2, 1, 80, True, torch.float32),  # head dim that is not a power of two
    (1, 17, 17, 2, 2, 16, True, torch.float32),
    (1, 17, 17, 16, 1, 32, True, torch.float16),  # MQA with 16 query heads
]


@pytest.mark.parametrize("b, t_q, t_k, h_q, h_kv, d, causal, dtype", CASES)
def test_flash_attn_matches_reference(b, t_q, t_k, h_q, h_kv, d, causal, dtype):
    q = torch.randn(b, t_q, h_q, d, dtype=dtype)
    k = torch.randn(b, t_k, h_kv, d, dtype=dtype)
    v = torch.randn(b, t_k, h_kv, d, dtype=dtype)
    scale = d ** -0.5
    check_op(_triton(causal, scale), _ref(causal, scale), [q, k, v], ["q", "k", "v"], [True, True, True],
             factors={"dq": 3.0})


def test_flash_attn_custom_scale_and_strided_views():
    """q, k, v as views of one fused projection (strided, never copied by the caller), and a non-default scale."""
    b, t, h_q, h_kv, d = 2, 40, 4, 2, 32
    qkv = torch.randn(b, t, (h_q + 2 * h_kv) * d)
    q = qkv[..., : h_q * d].view(b, t, h_q, d)
    k = qkv[..., h_q * d : (h_q + h_kv) * d].view(b, t, h_kv, d)
    v = qkv[..., (h_q + h_kv) * d :].view(b, t, h_kv, d)
    assert not q.is_contiguous()
    check_op(_triton(True, 0.3), _ref(True, 0.3), [q, k, v], ["q", "k", "v"], [True, True, True],
             factors={"dq": 3.0})


def test_flash_attn_kv_cache_view():
    """Decoding reads K/V as a prefix view of a preallocated cache (batch stride > T * H * D)."""
    cache_k, cache_v = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
    q = torch.randn(2, 3, 4, 32)
    k, v = cache_k[:, :21], cache_v[:, :21]
    with poisoned_outputs():
        out = kernels.flash_attn_func(q, k, v, causal=True, impl="triton")
    ref = reference.attention_ref(q.double(), k.double(), v.double(), True, 32 ** -0.5)
    same = reference.attention_ref(q, k, v, True, 32 ** -0.5)
    assert_rule("out", out, ref, same)


def test_flash_attn_default_scale_is_inverse_sqrt_d():
    q, k, v = torch.randn(1, 17, 2, 64), torch.randn(1, 17, 1, 64), torch.randn(1, 17, 1, 64)
    out = kernels.flash_attn_func(q, k, v, causal=False, impl="triton")
    explicit = kernels.flash_attn_func(q, k, v, causal=False, softmax_scale=64 ** -0.5, impl="triton")
    assert torch.equal(out, explicit)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_bf16_gpu(causal):
    b, t_q, t_k, h_q, h_kv, d = 2, 257, 513, 16, 4, 128
    q = torch.randn(b, t_q, h_q, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, t_k, h_kv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, t_k, h_kv, d, device="cuda", dtype=torch.bfloat16)
    check_op(_triton(causal, d ** -0.5), _ref(causal, d ** -0.5), [q, k, v], ["q", "k", "v"], [True, True, True],
             factors={"dq": 3.0})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flash_attn_fp_dtypes_gpu(dtype):
    for b, t_q, t_k, h_q, h_kv, d, causal, _ in CASES:
        q = torch.randn(b, t_q, h_q, d, device="cuda", dtype=dtype)
        k = torch.randn(b, t_k, h_kv, d, device="cuda", dtype=dtype)
        v = torch.randn(b, t_k, h_kv, d, device="cuda", dtype=dtype)
        check_op(_triton(causal, d ** -0.5), _ref(causal, d ** -0.5), [q, k, v], ["q", "k", "v"], [True] * 3,
                 factors={"dq": 3.0})


@pytest.mark.gpu
def test_flash_attn_backward_is_deterministic_gpu():
    q = torch.randn(2, 1024, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 1024, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 1024, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    first = None
    for _ in range(10):
        grads = torch.autograd.grad(kernels.flash_attn_func(q, k, v, impl="triton"), (q, k, v), do)
        if first is None:
            first = grads
        for name, g, g0 in zip("qkv", grads, first, strict=True):
            assert torch.equal(g, g0), f"d{name} differs between runs"

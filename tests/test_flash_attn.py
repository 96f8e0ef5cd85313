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


# ---------------------------------------------------------------------------------------------------------------
# Variants: each is forced by GEB_ATTN_VARIANT (the autotuner picks among them on a GPU), so each runs here.
# ---------------------------------------------------------------------------------------------------------------
VARIANT_CASES = [
    (1, 47, 130, 4, 1, 32, True, torch.float32),  # Tq < Tk causal: diagonal blocks off the block grid, ragged tails
    (2, 64, 64, 4, 2, 64, False, torch.float16),  # block multiples, non-causal: no masked block at all
    (1, 96, 96, 3, 1, 48, True, torch.float32),  # block multiples, causal; head dim below BLOCK_D
]


@pytest.mark.parametrize("variant", ["plain", "ws", "tma", "tma_ws"])
@pytest.mark.parametrize("b, t_q, t_k, h_q, h_kv, d, causal, dtype", VARIANT_CASES)
def test_flash_attn_variant_matches_reference(monkeypatch, variant, b, t_q, t_k, h_q, h_kv, d, causal, dtype):
    from kernels import flash_attn

    monkeypatch.setenv("GEB_ATTN_VARIANT", variant)
    q = torch.randn(b, t_q, h_q, d, dtype=dtype)
    k = torch.randn(b, t_k, h_kv, d, dtype=dtype)
    v = torch.randn(b, t_k, h_kv, d, dtype=dtype)
    check_op(_triton(causal, d ** -0.5), _ref(causal, d ** -0.5), [q, k, v], ["q", "k", "v"], [True] * 3,
             factors={"dq": 3.0})
    for kernel in (flash_attn._attn_fwd_kernel, flash_attn._attn_bwd_dkdv_kernel, flash_attn._attn_bwd_dq_kernel):
        chosen = kernel.best_config.kwargs
        assert (chosen["TMA"], chosen["WARP_SPEC"]) == flash_attn.VARIANTS[variant], kernel.fn.__name__


def test_unknown_variant_names_it(monkeypatch):
    monkeypatch.setenv("GEB_ATTN_VARIANT", "fast")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="GEB_ATTN_VARIANT"):
        kernels.flash_attn_func(q, q, q, impl="triton")


# ---------------------------------------------------------------------------------------------------------------
# Varlen: packed documents, FlashAttention-2's (total, H, D) + cu_seqlens convention.
# ---------------------------------------------------------------------------------------------------------------
DOC_LENGTHS = [1, 17, 130, 257]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _varlen(cu_q, cu_k, max_q, max_k, causal, scale):
    return lambda q, k, v: kernels.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                                          softmax_scale=scale, impl="triton")


def _varlen_ref(cu_q, cu_k, causal, scale):
    return lambda q, k, v: reference.attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale)


@pytest.mark.parametrize("h_q, h_kv, causal, dtype", [
    (4, 1, True, torch.float32), (3, 1, False, torch.float16), (2, 2, True, torch.float16),
])
def test_varlen_matches_per_document_reference(h_q, h_kv, causal, dtype):
    """Documents of 1, 17, 130 and 257 tokens in one packed row, against SDPA on each document alone."""
    cu, total, d = _cu(DOC_LENGTHS), sum(DOC_LENGTHS), 32
    q = torch.randn(total, h_q, d, dtype=dtype)
    k = torch.randn(total, h_kv, d, dtype=dtype)
    v = torch.randn(total, h_kv, d, dtype=dtype)
    scale = d ** -0.5
    check_op(_varlen(cu, cu, max(DOC_LENGTHS), max(DOC_LENGTHS), causal, scale), _varlen_ref(cu, cu, causal, scale),
             [q, k, v], ["q", "k", "v"], [True] * 3, factors={"dq": 3.0})


def test_varlen_other_key_lengths_strided_and_hopper_variant(monkeypatch):
    """Per-document Tq != Tk (bottom-right causal), q/k/v as views of one fused projection, the tma_ws variant."""
    monkeypatch.setenv("GEB_ATTN_VARIANT", "tma_ws")
    lengths_q, lengths_k = [5, 40, 1], [20, 40, 33]
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    h_q, h_kv, d = 4, 2, 32
    q = torch.randn(sum(lengths_q), h_q + 2, d)[:, :h_q]
    kv = torch.randn(sum(lengths_k), 2 * h_kv, d)
    k, v = kv[:, :h_kv], kv[:, h_kv:]
    assert not q.is_contiguous() and not k.is_contiguous()
    check_op(_varlen(cu_q, cu_k, 40, 40, True, 0.3), _varlen_ref(cu_q, cu_k, True, 0.3), [q, k, v],
             ["q", "k", "v"], [True] * 3, factors={"dq": 3.0})


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN document, inside the interpreter
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_never_reads_another_document(causal):
    """NaN in one document's q, k and v leaves every other document's outputs and gradients untouched (exactly):
    no program reads a block of a document it does not belong to."""
    lengths = [33, 70, 9, 40]
    cu, total = _cu(lengths), sum(lengths)
    q, k, v = torch.randn(total, 2, 16), torch.randn(total, 1, 16), torch.randn(total, 1, 16)
    do = torch.randn(total, 2, 16)
    attn = _varlen(cu, cu, max(lengths), max(lengths), causal, 0.25)

    def run(q, k, v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, do))

    clean = run(q, k, v)
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t[cu[1] : cu[2]] = float("nan")  # the second document
    dirty = run(*poisoned)
    keep = torch.ones(total, dtype=torch.bool)
    keep[cu[1] : cu[2]] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty, strict=True):
        assert torch.equal(a[keep], b[keep]), f"{name}: other documents changed"
        assert torch.isnan(b[~keep]).all(), name


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "ws", "tma", "tma_ws"])
def test_flash_attn_variants_bf16_gpu(monkeypatch, variant):
    monkeypatch.setenv("GEB_ATTN_VARIANT", variant)
    monkeypatch.setenv("GEB_AUTOTUNE", "0")
    for causal, t_q, t_k in ((True, 1024, 1024), (True, 257, 513), (False, 300, 300)):
        q = torch.randn(2, t_q, 16, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, t_k, 4, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(2, t_k, 4, 128, device="cuda", dtype=torch.bfloat16)
        check_op(_triton(causal, 128 ** -0.5), _ref(causal, 128 ** -0.5), [q, k, v], ["q", "k", "v"], [True] * 3,
                 factors={"dq": 3.0})


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_bf16_gpu(causal):
    lengths = [1, 17, 130, 257, 512, 1000]
    cu = _cu(lengths).cuda()
    total = sum(lengths)
    q = torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16)
    check_op(_varlen(cu, cu, max(lengths), max(lengths), causal, 128 ** -0.5),
             _varlen_ref(cu, cu, causal, 128 ** -0.5), [q, k, v], ["q", "k", "v"], [True] * 3, factors={"dq": 3.0})


@pytest.mark.gpu
def test_varlen_backward_is_deterministic_gpu():
    lengths = [512] * 8 + [1, 300, 1747]
    cu = _cu(lengths).cuda()
    total = sum(lengths)
    q = torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    first = None
    for _ in range(10):
        out = kernels.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), impl="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
        first = first or grads
        for name, g, g0 in zip("qkv", grads, first, strict=True):
            assert torch.equal(g, g0), f"d{name} differs between runs"

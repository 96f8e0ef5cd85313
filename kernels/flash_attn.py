"""FlashAttention-2 forward and backward in Triton: native GQA, bottom-right causal alignment, packed documents.

Layout: q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D), any strides with a unit stride on D (a view of a fused
projection or of a KV cache is read in place). Query head h reads KV head h // (Hq // Hkv): k and v are never
repeated in memory. With causal=True, query i sees keys j <= i + Tk - Tq (FlashAttention-2's convention).
Varlen (packed documents, FlashAttention-2's `varlen` convention): q (total_q, Hq, D), k and v (total_k, Hkv, D)
and int32 cumulative lengths; document b is rows cu_seqlens[b]:cu_seqlens[b + 1], attends only within itself, and
its programs visit only its own blocks, so the cost follows the sum of squared document lengths. The same kernels
serve both layouts (VARLEN constexpr): a varlen document is a batch row with its own lengths and row offset.

Kernels:
- `_attn_fwd_kernel`: one program per (query block, batch * query head); online softmax in fp32 and base 2,
  saves o and the log-sum-exp (base 2, already scaled) for the backward.
- `_attn_bwd_preprocess_kernel`: delta = rowsum(dO * o), in fp32.
- `_attn_bwd_dkdv_kernel`: one program per (key block, batch * KV head); it loops over the query heads of its
  group and over query blocks, accumulating dK and dV in registers: no atomics, deterministic.
- `_attn_bwd_dq_kernel`: one program per (query block, batch * query head), its own pass over key blocks.

Every block loop runs in two stages: blocks every row of the program sees in full run with no mask at all; only
the blocks on the causal diagonal and a ragged tail (a length that is not a block multiple) are masked. So with
block-multiple lengths a non-causal program masks nothing, and a causal one only its diagonal blocks.

Variants, constexprs in the autotune space so the autotuner, not a guess, picks per shape: `TMA` streams the loop's
operand (K/V in the forward and dQ, Q/dO in dK/dV) through tensor descriptors (TMA on Hopper; 16-byte aligned
pointers and strides), `WARP_SPEC` runs the unmasked loop as `tl.range(..., warp_specialize=True)`. Both need
Triton >= 3.4 and compute capability >= 9; the warp-specialized ones are tried only when forced (see `_variants`).
`GEB_ATTN_VARIANT=plain|ws|tma|tma_ws` forces one (tests reach each of them under the interpreter that way).
"""

import math
import os

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, empty_output, unit_last_stride

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256
# (TMA, WARP_SPEC) per variant name; the bit of each in the `variants` launch argument is its index here.
VARIANTS = {"plain": (False, False), "ws": (False, True), "tma": (True, False), "tma_ws": (True, True)}
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
HOPPER_TRITON = _TRITON_VERSION >= (3, 4)  # tl.make_tensor_descriptor and tl.range(warp_specialize=...)


def _autotune_configs(plain: list[tuple[int, int, int, int]], tma: list[tuple[int, int, int, int]],
                      ws: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles per variant: `plain`, `tma`, and `ws` for both
    warp-specialized ones (Hopper variants left out before Triton 3.4). Under the interpreter and with
    GEB_AUTOTUNE=0 one small tile per variant; each launch prunes to the variants it allows (`_variants`)."""
    if INTERPRET:
        # Multi-config autotune fails in the interpreter ("0 active drivers"): the prune leaves one config. 32 keeps
        # dots GPU-legal (>= 16).
        plain = tma = ws = [(32, 32, 4, 1)]
    elif os.environ.get("GEB_AUTOTUNE") == "0":
        plain, tma, ws = plain[-1:], tma[-1:], ws[-1:]
    tiles = {"plain": plain, "ws": ws, "tma": tma, "tma_ws": ws}
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": variant_tma, "WARP_SPEC": variant_ws}, num_warps=w,
                          num_stages=s)
            for name, (variant_tma, variant_ws) in VARIANTS.items() if name == "plain" or HOPPER_TRITON
            for m, n, w, s in tiles[name]]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs of the allowed variants (bit mask `variants`) whose tiles fit the head dim's registers."""
    allowed = kwargs.get("variants", named_args.get("variants"))
    bits = {v: 1 << i for i, v in enumerate(VARIANTS.values())}
    kept = [c for c in configs if allowed & bits[(c.kwargs["TMA"], c.kwargs["WARP_SPEC"])]]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0))
    small = [c for c in kept if block_d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return small or kept


# Sequence lengths enter the key rounded up to powers of two: one tuning per bucket, not per length.
_AUTOTUNE_KEY = ["t_q_bucket", "t_k_bucket", "BLOCK_D", "CAUSAL", "VARLEN", "variants"]


@triton.jit
def _sequence(i_b, cu_q, cu_k, t_q, t_k, VARLEN: tl.constexpr):
    """Row 0 and lengths of batch row i_b's queries and keys; for varlen, of document i_b of the packed rows."""
    if VARLEN:
        q0 = tl.load(cu_q + i_b).to(tl.int64)
        k0 = tl.load(cu_k + i_b).to(tl.int64)
        t_q = (tl.load(cu_q + i_b + 1) - q0).to(tl.int32)
        t_k = (tl.load(cu_k + i_b + 1) - k0).to(tl.int32)
    else:
        q0 = 0
        k0 = 0
    return q0, k0, t_q, t_k


@triton.jit
def _key_stages(i_m, t_q, t_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A query block's key loop bounds: keys [0, lo) are seen by all its rows (no mask), [lo, hi) need the mask."""
    lo = t_k // BLOCK_N * BLOCK_N
    hi = t_k
    if CAUSAL:
        # Bottom-right alignment: row i sees keys <= i + t_k - t_q. Past hi no row sees anything; a key block below
        # lo is seen in full by the block's first row, hence by every row.
        hi = tl.minimum(t_k, (i_m + 1) * BLOCK_M + t_k - t_q)
        lo = tl.minimum(lo, tl.maximum(i_m * BLOCK_M + t_k - t_q + 1, 0) // BLOCK_N * BLOCK_N)
    # A program past the end of its (shorter) document runs no loop and stores nothing; an early return would be
    # simpler, but the branch it makes stops Triton's warp specializer.
    live = i_m * BLOCK_M < t_q
    return tl.where(live, lo, 0), tl.where(live, hi, 0)


@triton.jit
def _load_rows(p, o_r, m_r, m_d, stride, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A block of rows o_r of a (rows, D) matrix at p (a [1, BD] pointer to row 0); zeros where masked."""
    if MASKED:
        return tl.load(p + o_r[:, None] * stride, mask=m_r[:, None] & m_d[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(p + o_r[:, None] * stride)
    else:
        return tl.load(p + o_r[:, None] * stride, mask=m_d[None, :], other=0.0)


@triton.jit
def _load_kv(p_k, p_v, d_k, d_v, start_n, o_n, m_n, m_d, stride_kt, stride_vt,
             MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """One key block of k and v, through the tensor descriptors d_k/d_v (zero-filled past the end) or pointers."""
    if TMA:
        b_k = d_k.load([start_n, 0])
        b_v = d_v.load([start_n, 0])
    else:
        b_k = _load_rows(p_k, o_n, m_n, m_d, stride_kt, MASKED, EVEN_D)
        b_v = _load_rows(p_v, o_n, m_n, m_d, stride_vt, MASKED, EVEN_D)
    return b_k, b_v


@triton.jit
def _descriptor(p, rows, head_dim, stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """A (rows, head_dim) tensor descriptor at p when TMA, else p itself (the loads then use pointers)."""
    if TMA:
        return tl.make_tensor_descriptor(p, shape=[rows, head_dim], strides=[stride, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return p


@triton.jit
def _fwd_step(b_acc, b_den, b_max, b_q, p_k, p_v, d_k, d_v, start_n, o_m, m_d, stride_kt, stride_vt, t_q, t_k,
              scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the online softmax: returns the updated accumulator, denominator and running max."""
    o_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < t_k
    b_k, b_v = _load_kv(p_k, p_v, d_k, d_v, start_n, o_n, m_n, m_d, stride_kt, stride_vt, MASKED, EVEN_D, TMA)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2  # [BM, BN]
    if MASKED:
        m_s = m_n[None, :]
        if CAUSAL:
            m_s = m_s & (o_n[None, :] <= o_m[:, None] + t_k - t_q)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
        # A row that has seen only masked keys keeps max -inf; subtract 0 there so exp2 gives 0, not NaN.
        b_max_safe = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
    else:
        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
        b_max_safe = b_max_new
    b_p = tl.exp2(b_s - b_max_safe[:, None])  # [BM, BN]
    b_alpha = tl.exp2(b_max - b_max_safe)
    b_den = b_den * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_acc, b_den, b_max_new


@triton.autotune(
    configs=_autotune_configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)],
                              tma=[(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)], ws=[(128, 64, 8, 3)]),
    key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _attn_fwd_kernel(
    q, k, v, o, lse, cu_q, cu_k,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    t_q, t_k, h_q, n_rep, head_dim, scale_log2,
    t_q_bucket, t_k_bucket, variants,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """o and the base-2 log-sum-exp of one query block of one (batch, query head), by online softmax over keys."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // h_q
    i_hq = i_bh % h_q
    i_hk = i_hq // n_rep
    q0, k0, t_q, t_k = _sequence(i_b, cu_q, cu_k, t_q, t_k, VARLEN)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_m = o_m < t_q
    m_d = o_d < head_dim
    p_q = q + i_b * stride_qb + i_hq * stride_qh + q0 * stride_qt + o_d[None, :]  # [1, BD]: row 0 of this head
    b_q = _load_rows(p_q, o_m, m_m, m_d, stride_qt, True, EVEN_D)  # [BM, BD]
    p_k = k + i_b * stride_kb + i_hk * stride_kh + k0 * stride_kt + o_d[None, :]  # [1, BD]
    p_v = v + i_b * stride_vb + i_hk * stride_vh + k0 * stride_vt + o_d[None, :]  # [1, BD]
    d_k = _descriptor(k + i_b * stride_kb + i_hk * stride_kh + k0 * stride_kt, t_k, head_dim, stride_kt,
                      BLOCK_N, BLOCK_D, TMA)
    d_v = _descriptor(v + i_b * stride_vb + i_hk * stride_vh + k0 * stride_vt, t_k, head_dim, stride_vt,
                      BLOCK_N, BLOCK_D, TMA)

    # Running max (base 2), running denominator and output accumulator, all fp32.
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_den = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_stages(i_m, t_q, t_k, CAUSAL, BLOCK_M, BLOCK_N)
    if WARP_SPEC:
        for start_n in tl.range(0, lo, BLOCK_N, warp_specialize=True):
            b_acc, b_den, b_max = _fwd_step(b_acc, b_den, b_max, b_q, p_k, p_v, d_k, d_v, start_n, o_m, m_d,
                                            stride_kt, stride_vt, t_q, t_k, scale_log2, False, CAUSAL, EVEN_D, TMA,
                                            DOT_PRECISION, BLOCK_N)
    else:
        for start_n in range(0, lo, BLOCK_N):
            b_acc, b_den, b_max = _fwd_step(b_acc, b_den, b_max, b_q, p_k, p_v, d_k, d_v, start_n, o_m, m_d,
                                            stride_kt, stride_vt, t_q, t_k, scale_log2, False, CAUSAL, EVEN_D, TMA,
                                            DOT_PRECISION, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        b_acc, b_den, b_max = _fwd_step(b_acc, b_den, b_max, b_q, p_k, p_v, d_k, d_v, start_n, o_m, m_d,
                                        stride_kt, stride_vt, t_q, t_k, scale_log2, True, CAUSAL, EVEN_D, TMA,
                                        DOT_PRECISION, BLOCK_N)

    # A query that sees no key at all (only when Tq > Tk and causal) outputs 0 and gets lse = +inf, so p = 0
    # in the backward.
    m_no_key = b_den == 0.0
    b_o = b_acc / tl.where(m_no_key, 1.0, b_den)[:, None]
    b_lse = tl.where(m_no_key, float("inf"), b_max + tl.log2(tl.where(m_no_key, 1.0, b_den)))
    p_o = o + i_b * stride_ob + i_hq * stride_oh + (q0 + o_m[:, None]) * stride_ot + o_d[None, :]  # [BM, BD]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(lse + i_b * stride_lb + i_hq * stride_lh + q0 + o_m, b_lse, mask=m_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o, do, delta,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    t_q, h_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(do * o) in fp32 for one query block of one (batch, query head); varlen: batch 1, all rows."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // h_q
    i_hq = i_bh % h_q
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < t_q
    m_md = m_m[:, None] & (o_d < head_dim)[None, :]  # [BM, BD]
    p_o = o + i_b * stride_ob + i_hq * stride_oh + o_m[:, None] * stride_ot + o_d[None, :]
    b_o = tl.load(p_o, mask=m_md, other=0.0)
    p_do = do + i_b * stride_dob + i_hq * stride_doh + o_m[:, None] * stride_dot + o_d[None, :]
    b_do = tl.load(p_do, mask=m_md, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BM]
    tl.store(delta + i_b * stride_lb + i_hq * stride_lh + o_m, b_delta, mask=m_m)


@triton.jit
def _dkdv_step(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, p_lse, p_delta, start_m, o_n, m_d, stride_qt, stride_dot,
               t_q, t_k, scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block's contribution to a key block's dK and dV."""
    o_m = start_m + tl.arange(0, BLOCK_M)  # [BM]
    m_m = o_m < t_q
    if TMA:
        b_q = d_q.load([start_m, 0])  # [BM, BD]
        b_do = d_do.load([start_m, 0])  # [BM, BD]
    else:
        b_q = _load_rows(p_q, o_m, m_m, m_d, stride_qt, MASKED, EVEN_D)
        b_do = _load_rows(p_do, o_m, m_m, m_d, stride_dot, MASKED, EVEN_D)
    if MASKED:
        # Rows past the end get lse = +inf, hence p = 0.
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("inf"))  # [BM]
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)  # [BM]
    else:
        b_lse = tl.load(p_lse + o_m)
        b_delta = tl.load(p_delta + o_m)
    # Transposed scores (keys x queries) so dK and dV come out of plain dots.
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * scale_log2  # [BN, BM]
    b_pt = tl.exp2(b_st - b_lse[None, :])  # [BN, BM]
    if MASKED:
        if CAUSAL:
            b_pt = tl.where(o_n[:, None] <= o_m[None, :] + t_k - t_q, b_pt, 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BN, BM]
    b_dst = b_pt * (b_dpt - b_delta[None, :])  # [BN, BM]
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    return b_dk, b_dv


@triton.autotune(
    configs=_autotune_configs([(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (16, 64, 4, 1), (32, 64, 4, 2)],
                              tma=[(64, 128, 8, 2), (64, 64, 4, 2)], ws=[(64, 128, 8, 2)]),
    key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_lb, stride_lh,
    t_q, t_k, h_q, h_k, n_rep, head_dim, sm_scale, scale_log2,
    t_q_bucket, t_k_bucket, variants,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """dk and dv of one key block of one (batch, KV head), summed over its query heads and query blocks."""
    # BLOCK_N keys of one KV head stay in registers; BLOCK_M query rows stream past them.
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // h_k
    i_hk = i_bh % h_k
    q0, k0, t_q, t_k = _sequence(i_b, cu_q, cu_k, t_q, t_k, VARLEN)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < t_k
    m_d = o_d < head_dim
    p_k = k + i_b * stride_kb + i_hk * stride_kh + k0 * stride_kt + o_d[None, :]
    p_v = v + i_b * stride_vb + i_hk * stride_vh + k0 * stride_vt + o_d[None, :]
    b_k = _load_rows(p_k, o_n, m_n, m_d, stride_kt, True, EVEN_D)  # [BN, BD]
    b_v = _load_rows(p_v, o_n, m_n, m_d, stride_vt, True, EVEN_D)  # [BN, BD]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks [lo, mid) hold the diagonal (masked), [mid, full) see every key here (no mask), [full, t_q) is
    # the ragged tail (masked). Query i sees key j iff i >= j - (t_k - t_q).
    offset = t_k - t_q
    lo = 0
    mid = 0
    if CAUSAL:
        lo = tl.maximum(i_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(i_n * BLOCK_N + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    full = t_q // BLOCK_M * BLOCK_M
    end = tl.where(i_n * BLOCK_N < t_k, t_q, 0)  # past its document's end a program runs no loop (see _key_stages)
    lo = tl.where(end > 0, lo, 0)
    mid = tl.where(end > 0, mid, 0)
    full = tl.where(end > 0, full, 0)
    # GQA: every query head of this KV head's group adds its contribution here, in registers.
    for i_rep in range(n_rep):
        i_hq = i_hk * n_rep + i_rep
        base_q = q + i_b * stride_qb + i_hq * stride_qh + q0 * stride_qt
        base_do = do + i_b * stride_dob + i_hq * stride_doh + q0 * stride_dot
        p_q = base_q + o_d[None, :]  # [1, BD]: row 0 of this query head
        p_do = base_do + o_d[None, :]  # [1, BD]
        d_q = _descriptor(base_q, t_q, head_dim, stride_qt, BLOCK_M, BLOCK_D, TMA)
        d_do = _descriptor(base_do, t_q, head_dim, stride_dot, BLOCK_M, BLOCK_D, TMA)
        o_stats = i_b * stride_lb + i_hq * stride_lh + q0  # this query head's row 0 in lse and delta
        p_lse = lse + o_stats
        p_delta = delta + o_stats
        for start_m in range(lo, tl.minimum(mid, end), BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, p_lse, p_delta, start_m, o_n, m_d,
                                    stride_qt, stride_dot, t_q, t_k, scale_log2, True, CAUSAL, EVEN_D, TMA,
                                    DOT_PRECISION, BLOCK_M)
        if WARP_SPEC:
            for start_m in tl.range(mid, full, BLOCK_M, warp_specialize=True):
                b_dk, b_dv = _dkdv_step(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, p_lse, p_delta, start_m, o_n,
                                        m_d, stride_qt, stride_dot, t_q, t_k, scale_log2, False, CAUSAL, EVEN_D, TMA,
                                        DOT_PRECISION, BLOCK_M)
        else:
            for start_m in range(mid, full, BLOCK_M):
                b_dk, b_dv = _dkdv_step(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, p_lse, p_delta, start_m, o_n,
                                        m_d, stride_qt, stride_dot, t_q, t_k, scale_log2, False, CAUSAL, EVEN_D, TMA,
                                        DOT_PRECISION, BLOCK_M)
        for start_m in range(tl.maximum(mid, full), end, BLOCK_M):
            b_dk, b_dv = _dkdv_step(b_dk, b_dv, b_k, b_v, p_q, p_do, d_q, d_do, p_lse, p_delta, start_m, o_n, m_d,
                                    stride_qt, stride_dot, t_q, t_k, scale_log2, True, CAUSAL, EVEN_D, TMA,
                                    DOT_PRECISION, BLOCK_M)

    b_dk = b_dk * sm_scale
    o_out = i_b * stride_dkb + i_hk * stride_dkh + (k0 + o_n[:, None]) * stride_dkt + o_d[None, :]  # [BN, BD]
    # dk and dv are allocated alike, so they share strides.
    m_nd = m_n[:, None] & m_d[None, :]
    tl.store(dk + o_out, b_dk.to(dk.dtype.element_ty), mask=m_nd)
    tl.store(dv + o_out, b_dv.to(dv.dtype.element_ty), mask=m_nd)


@triton.jit
def _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, d_k, d_v, start_n, o_m, m_d, stride_kt, stride_vt, t_q, t_k,
             scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block's contribution to a query block's dQ."""
    o_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < t_k
    b_k, b_v = _load_kv(p_k, p_v, d_k, d_v, start_n, o_n, m_n, m_d, stride_kt, stride_vt, MASKED, EVEN_D, TMA)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2  # [BM, BN]
    b_p = tl.exp2(b_s - b_lse[:, None])  # [BM, BN]
    if MASKED:
        m_s = m_n[None, :]
        if CAUSAL:
            m_s = m_s & (o_n[None, :] <= o_m[:, None] + t_k - t_q)
        b_p = tl.where(m_s, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])  # [BM, BN]
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)


@triton.autotune(
    configs=_autotune_configs([(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2)],
                              tma=[(128, 64, 8, 2), (64, 64, 4, 2)], ws=[(128, 64, 8, 2)]),
    key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, cu_q, cu_k,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    t_q, t_k, h_q, n_rep, head_dim, sm_scale, scale_log2,
    t_q_bucket, t_k_bucket, variants,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """dq of one query block of one (batch, query head), by its own pass over the key blocks it sees."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // h_q
    i_hq = i_bh % h_q
    i_hk = i_hq // n_rep
    q0, k0, t_q, t_k = _sequence(i_b, cu_q, cu_k, t_q, t_k, VARLEN)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    m_m = o_m < t_q
    m_d = o_d < head_dim
    p_q = q + i_b * stride_qb + i_hq * stride_qh + q0 * stride_qt + o_d[None, :]
    b_q = _load_rows(p_q, o_m, m_m, m_d, stride_qt, True, EVEN_D)  # [BM, BD]
    p_do = do + i_b * stride_dob + i_hq * stride_doh + q0 * stride_dot + o_d[None, :]
    b_do = _load_rows(p_do, o_m, m_m, m_d, stride_dot, True, EVEN_D)  # [BM, BD]
    o_stats = i_b * stride_lb + i_hq * stride_lh + q0 + o_m
    b_lse = tl.load(lse + o_stats, mask=m_m, other=float("inf"))  # [BM]
    b_delta = tl.load(delta + o_stats, mask=m_m, other=0.0)  # [BM]
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_k = k + i_b * stride_kb + i_hk * stride_kh + k0 * stride_kt + o_d[None, :]  # [1, BD]
    p_v = v + i_b * stride_vb + i_hk * stride_vh + k0 * stride_vt + o_d[None, :]  # [1, BD]
    d_k = _descriptor(k + i_b * stride_kb + i_hk * stride_kh + k0 * stride_kt, t_k, head_dim, stride_kt,
                      BLOCK_N, BLOCK_D, TMA)
    d_v = _descriptor(v + i_b * stride_vb + i_hk * stride_vh + k0 * stride_vt, t_k, head_dim, stride_vt,
                      BLOCK_N, BLOCK_D, TMA)

    lo, hi = _key_stages(i_m, t_q, t_k, CAUSAL, BLOCK_M, BLOCK_N)
    if WARP_SPEC:
        for start_n in tl.range(0, lo, BLOCK_N, warp_specialize=True):
            b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, d_k, d_v, start_n, o_m, m_d, stride_kt,
                            stride_vt, t_q, t_k, scale_log2, False, CAUSAL, EVEN_D, TMA, DOT_PRECISION, BLOCK_N)
    else:
        for start_n in range(0, lo, BLOCK_N):
            b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, d_k, d_v, start_n, o_m, m_d, stride_kt,
                            stride_vt, t_q, t_k, scale_log2, False, CAUSAL, EVEN_D, TMA, DOT_PRECISION, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        b_dq = _dq_step(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, d_k, d_v, start_n, o_m, m_d, stride_kt,
                        stride_vt, t_q, t_k, scale_log2, True, CAUSAL, EVEN_D, TMA, DOT_PRECISION, BLOCK_N)

    b_dq = b_dq * sm_scale
    p_dq = dq + i_b * stride_dqb + i_hq * stride_dqh + (q0 + o_m[:, None]) * stride_dqt + o_d[None, :]  # [BM, BD]
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for tensor descriptors made inside kernels (triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether TMA can read these: 16-byte aligned base pointers and strides (but the unit last one)."""
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def _variants(*tensors: torch.Tensor) -> int:
    """Bit mask of the variants the autotuner may try: GEB_ATTN_VARIANT's alone when set; else plain under the
    interpreter, with GEB_AUTOTUNE=0 and before compute capability 9, and plain and TMA (when the layout allows) on
    a Hopper or newer GPU. The warp-specialized ones run only when forced: built offline for sm_90, Triton 3.6 and
    3.9 emit the same code as without at 8 warps and fail to compile these loops at 4."""
    names = list(VARIANTS)
    forced = os.environ.get("GEB_ATTN_VARIANT")
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"GEB_ATTN_VARIANT is {forced!r}; expected one of {names}")
        if not HOPPER_TRITON and forced != "plain":
            raise ValueError(f"GEB_ATTN_VARIANT={forced} needs triton >= 3.4 (this is {triton.__version__})")
        if VARIANTS[forced][0] and not _aligned(*tensors):
            raise ValueError(f"GEB_ATTN_VARIANT={forced} needs 16-byte aligned q/k/v pointers and strides")
        allowed = [forced]
    elif INTERPRET or os.environ.get("GEB_AUTOTUNE") == "0" or not HOPPER_TRITON:
        allowed = ["plain"]
    elif torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        allowed = ["plain"]
    else:
        allowed = ["plain", "tma"] if _aligned(*tensors) else ["plain"]
    if any(VARIANTS[n][0] for n in allowed) and tensors[0].is_cuda:
        triton.set_allocator(_tma_scratch)
    return sum(1 << names.index(n) for n in allowed)


def _launch_args(q: torch.Tensor, t_q: int, t_k: int, varlen: bool, causal: bool, variants: int) -> dict:
    """The autotune key and the meta-parameters every attention kernel takes (all but the preprocess)."""
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    return {
        "t_q_bucket": triton.next_power_of_2(t_q), "t_k_bucket": triton.next_power_of_2(t_k), "variants": variants,
        "CAUSAL": causal, "VARLEN": varlen, "BLOCK_D": block_d, "EVEN_D": block_d == d,
        # fp32 inputs: full-precision dots on a GPU too (tl.dot would use TF32 otherwise).
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides of t; a varlen (total, H, D) tensor is one batch row of stride 0."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


class _Layout:
    """Sizes of one call in either layout: dense (B, T, H, D), or varlen (total, H, D) with cu_seqlens."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None,
                 max_q: int, max_k: int) -> None:
        self.varlen = cu_q is not None
        self.h_q, self.h_k, self.d = q.shape[-2], k.shape[-2], q.shape[-1]
        if self.varlen:
            # Programs run per document; t_q/t_k are the longest lengths (grid size, autotune bucket).
            self.batch, self.t_q, self.t_k = cu_q.numel() - 1, max_q, max_k
            self.rows_q = q.shape[0]
            self.cu_q, self.cu_k = cu_q, cu_k
            self.lse_shape, self.lse_strides = (self.h_q, self.rows_q), (0, self.rows_q)
        else:
            self.batch, self.t_q, self.t_k = q.shape[0], q.shape[1], k.shape[1]
            self.rows_q = self.t_q
            self.cu_q = self.cu_k = q  # unused pointers (VARLEN is off)
            self.lse_shape = (self.batch, self.h_q, self.t_q)
            self.lse_strides = (self.h_q * self.t_q, self.t_q)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
             cu_q: torch.Tensor | None = None, cu_k: torch.Tensor | None = None, max_q: int = 0,
             max_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns O shaped like q and the base-2 LSE in fp32, (B, Hq, Tq) or, varlen,
    (Hq, total_q)."""
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    lay = _Layout(q, k, cu_q, cu_k, max_q, max_k)
    o = empty_output(tuple(q.shape), q.dtype, q.device)
    lse = empty_output(lay.lse_shape, torch.float32, q.device)
    args = _launch_args(q, lay.t_q, lay.t_k, lay.varlen, causal, _variants(q, k, v))
    _attn_fwd_kernel[lambda meta: (triton.cdiv(lay.t_q, meta["BLOCK_M"]), lay.batch * lay.h_q)](
        q, k, v, o, lse, lay.cu_q, lay.cu_k,
        *_strides(q, lay.varlen), *_strides(k, lay.varlen), *_strides(v, lay.varlen),
        *_strides(o, lay.varlen), *lay.lse_strides,
        lay.t_q, lay.t_k, lay.h_q, lay.h_q // lay.h_k, lay.d, sm_scale * LOG2_E,
        **args,
    )
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, causal: bool, sm_scale: float, cu_q: torch.Tensor | None = None,
             cu_k: torch.Tensor | None = None, max_q: int = 0,
             max_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels: returns dq, dk, dv shaped like q, k, v."""
    do, q, k, v, o = (unit_last_stride(t) for t in (do, q, k, v, o))
    lay = _Layout(q, k, cu_q, cu_k, max_q, max_k)
    args = _launch_args(q, lay.t_q, lay.t_k, lay.varlen, causal, _variants(q, k, v, do))
    strides = {name: _strides(t, lay.varlen) for name, t in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do))}

    delta = empty_output(lay.lse_shape, torch.float32, q.device)
    pre_block_m = 64
    # Varlen: rowsum over all packed rows at once (one batch row of total_q rows).
    pre_batch = 1 if lay.varlen else lay.batch
    _attn_bwd_preprocess_kernel[(triton.cdiv(lay.rows_q, pre_block_m), pre_batch * lay.h_q)](
        o, do, delta, *strides["o"], *strides["do"], *lay.lse_strides,
        lay.rows_q, lay.h_q, lay.d, BLOCK_M=pre_block_m, BLOCK_D=args["BLOCK_D"],
    )

    dk = empty_output(tuple(k.shape), k.dtype, k.device)
    dv = empty_output(tuple(v.shape), v.dtype, v.device)
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(lay.t_k, meta["BLOCK_N"]), lay.batch * lay.h_k)](
        q, k, v, do, lse, delta, dk, dv, lay.cu_q, lay.cu_k,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"], *_strides(dk, lay.varlen),
        *lay.lse_strides,
        lay.t_q, lay.t_k, lay.h_q, lay.h_k, lay.h_q // lay.h_k, lay.d, sm_scale, sm_scale * LOG2_E,
        **args,
    )

    dq = empty_output(tuple(q.shape), q.dtype, q.device)
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(lay.t_q, meta["BLOCK_M"]), lay.batch * lay.h_q)](
        q, k, v, do, lse, delta, dq, lay.cu_q, lay.cu_k,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"], *_strides(dq, lay.varlen),
        *lay.lse_strides,
        lay.t_q, lay.t_k, lay.h_q, lay.h_q // lay.h_k, lay.d, sm_scale, sm_scale * LOG2_E,
        **args,
    )
    return dq, dk, dv


# torch.library ops: opaque to torch.compile (no graph break), with fake implementations for tracing.
@torch.library.custom_op("geb::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attn_fwd(q, k, v, causal, sm_scale)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, sm_scale):
    """Output shapes for tracing: o like q, lse (B, Hq, Tq) fp32."""
    batch, t_q, h_q, d = q.shape
    return q.new_empty((batch, t_q, h_q, d)), q.new_empty((batch, h_q, t_q), dtype=torch.float32)


@torch.library.custom_op("geb::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool,
                       sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attn_bwd(do, q, k, v, o, lse, causal, sm_scale)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale):
    """Output shapes for tracing: dq, dk, dv like q, k, v."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("geb::flash_attn_varlen_fwd", mutates_args=())
def _flash_attn_varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                              cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool,
                              sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attn_fwd(q, k, v, causal, sm_scale, cu_q, cu_k, max_q, max_k)


@_flash_attn_varlen_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale):
    """Output shapes for tracing: o like q, lse (Hq, total_q) fp32."""
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("geb::flash_attn_varlen_bwd", mutates_args=())
def _flash_attn_varlen_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                              causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attn_bwd(do, q, k, v, o, lse, causal, sm_scale, cu_q, cu_k, max_q, max_k)


@_flash_attn_varlen_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, sm_scale):
    """Output shapes for tracing: dq, dk, dv like q, k, v."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FlashAttnFunction(torch.autograd.Function):
    """Autograd glue: saves q, k, v, O and LSE; the backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, lse = torch.ops.geb.flash_attn_fwd(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.geb.flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


class FlashAttnVarlenFunction(torch.autograd.Function):
    """Autograd glue of the varlen layout: also saves the cumulative lengths."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale):
        o, lse = torch.ops.geb.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.causal, ctx.sm_scale = max_q, max_k, causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.geb.flash_attn_varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, ctx.max_q, ctx.max_k,
                                                         ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attn_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                      sm_scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 on (B, T, H, D) tensors with native GQA; differentiable."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if v is k:
        v = v.view_as(v)  # torch.compile cannot trace autograd.Function.apply given one tensor twice; a view it can
    return FlashAttnFunction.apply(q, k, v, causal, float(sm_scale))


def flash_attn_varlen_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                             sm_scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 on packed documents: q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 cu_seqlens."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if v is k:
        v = v.view_as(v)
    if cu_seqlens_k is cu_seqlens_q:
        cu_seqlens_k = cu_seqlens_k.view_as(cu_seqlens_k)
    return FlashAttnVarlenFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                         causal, float(sm_scale))

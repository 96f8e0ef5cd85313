"""FlashAttention-2 forward and backward in Triton, with native GQA and bottom-right causal alignment.

Layout: q (B, Tq, Hq, D), k and v (B, Tk, Hkv, D), any strides with a unit stride on D (a view of a fused
projection or of a KV cache is read in place). Query head h reads KV head h // (Hq // Hkv): k and v are never
repeated in memory. With causal=True, query i sees keys j <= i + Tk - Tq (FlashAttention-2's convention).

Kernels:
- `_attn_fwd_kernel`: one program per (query block, batch * query head); online softmax in fp32 and base 2,
  saves o and the log-sum-exp (base 2, already scaled) for the backward.
- `_attn_bwd_preprocess_kernel`: delta = rowsum(dO * o), in fp32.
- `_attn_bwd_dkdv_kernel`: one program per (key block, batch * KV head); it loops over the query heads of its
  group and over query blocks, accumulating dK and dV in registers: no atomics, deterministic.
- `_attn_bwd_dq_kernel`: one program per (query block, batch * query head), its own pass over key blocks.
"""

import math
import os

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, empty_output, unit_last_stride

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256


def _autotune_configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages); one under the interpreter, and only the last
    (a small one) with GEB_AUTOTUNE=0, for test sweeps over many shapes on a GPU."""
    if INTERPRET:
        # Multi-config autotune fails in the interpreter ("0 active drivers"); 32 keeps dots GPU-legal (>= 16).
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if os.environ.get("GEB_AUTOTUNE") == "0":
        gpu = gpu[-1:]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


def _prune_for_head_dim(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose tiles do not fit the head dim's registers (D = 256 needs small tiles)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0))
    kept = [c for c in configs if block_d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs


# Sequence lengths enter the key rounded up to powers of two: one tuning per bucket, not per length.
_AUTOTUNE_KEY = ["t_q_bucket", "t_k_bucket", "BLOCK_D", "CAUSAL"]


@triton.jit
def _query_block(i_m, i_bh, t_q, t_k, h_q, n_rep, head_dim,
                 CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query-block program's batch, query head and KV head, its row and head-dim offsets and masks, and the end
    of the keys it sees (the forward and dQ kernels share this)."""
    i_b = i_bh // h_q
    i_hq = i_bh % h_q
    i_hk = i_hq // n_rep
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    hi = t_k
    if CAUSAL:
        # Key blocks past the last key this query block can see (bottom-right alignment) are skipped entirely.
        hi = tl.minimum(t_k, (i_m + 1) * BLOCK_M + t_k - t_q)
    return i_b, i_hq, i_hk, o_m, o_d, o_m < t_q, o_d < head_dim, hi


@triton.jit
def _key_block_scores(b_q, p_k, p_v, start_n, o_m, m_m, m_d, stride_kt, stride_vt, t_q, t_k, scale_log2,
                      CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block's k and v, the query block's scores against it (scaled, base 2) and which of them count:
    query i sees keys j <= i + t_k - t_q."""
    o_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    m_n = o_n < t_k
    b_k = tl.load(p_k + o_n[:, None] * stride_kt, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
    b_v = tl.load(p_v + o_n[:, None] * stride_vt, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2  # [BM, BN]
    m_s = m_m[:, None] & m_n[None, :]  # [BM, BN]
    if CAUSAL:
        m_s = m_s & (o_n[None, :] <= o_m[:, None] + t_k - t_q)
    return b_k, b_v, b_s, m_s


@triton.autotune(
    configs=_autotune_configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)]),
    key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim},
)
@triton.jit
def _attn_fwd_kernel(
    q, k, v, o, lse,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    t_q, t_k, h_q, n_rep, head_dim, scale_log2,
    t_q_bucket, t_k_bucket,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """o and the base-2 log-sum-exp of one query block of one (batch, query head), by online softmax over keys."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b, i_hq, i_hk, o_m, o_d, m_m, m_d, hi = _query_block(i_m, i_bh, t_q, t_k, h_q, n_rep, head_dim,
                                                           CAUSAL, BLOCK_D, BLOCK_M)
    p_q = q + i_b * stride_qb + i_hq * stride_qh + o_m[:, None] * stride_qt + o_d[None, :]  # [BM, BD]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh + o_d[None, :]  # [1, BD]: row 0 of this head's keys
    p_v = v + i_b * stride_vb + i_hk * stride_vh + o_d[None, :]  # [1, BD]

    # Running max (base 2), running denominator and output accumulator, all fp32.
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_den = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, hi, BLOCK_N):
        b_k, b_v, b_s, m_s = _key_block_scores(b_q, p_k, p_v, start_n, o_m, m_m, m_d, stride_kt, stride_vt, t_q,
                                               t_k, scale_log2, CAUSAL, DOT_PRECISION, BLOCK_N)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
        # A row that has seen only masked keys keeps max -inf; subtract 0 there so exp2 gives 0, not NaN.
        b_max_safe = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
        b_p = tl.exp2(b_s - b_max_safe[:, None])  # [BM, BN]
        b_alpha = tl.exp2(b_max - b_max_safe)
        b_den = b_den * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_max = b_max_new

    # A query that sees no key at all (only when Tq > Tk and causal) outputs 0 and gets lse = +inf, so p = 0
    # in the backward.
    m_no_key = b_den == 0.0
    b_o = b_acc / tl.where(m_no_key, 1.0, b_den)[:, None]
    b_lse = tl.where(m_no_key, float("inf"), b_max + tl.log2(tl.where(m_no_key, 1.0, b_den)))
    p_o = o + i_b * stride_ob + i_hq * stride_oh + o_m[:, None] * stride_ot + o_d[None, :]  # [BM, BD]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(lse + i_bh * t_q + o_m, b_lse, mask=m_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o, do, delta,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    t_q, h_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(do * o) in fp32 for one query block of one (batch, query head)."""
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
    tl.store(delta + i_bh * t_q + o_m, b_delta, mask=m_m)


@triton.autotune(
    configs=_autotune_configs([(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (16, 64, 4, 1), (32, 64, 4, 2)]),
    key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim},
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    t_q, t_k, h_q, h_k, n_rep, head_dim, sm_scale, scale_log2,
    t_q_bucket, t_k_bucket,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk and dv of one key block of one (batch, KV head), summed over its query heads and query blocks."""
    # BLOCK_N keys of one KV head stay in registers; BLOCK_M query rows stream past them.
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // h_k
    i_hk = i_bh % h_k

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < t_k
    m_d = o_d < head_dim
    m_nd = m_n[:, None] & m_d[None, :]  # [BN, BD]

    p_k = k + i_b * stride_kb + i_hk * stride_kh + o_n[:, None] * stride_kt + o_d[None, :]
    p_v = v + i_b * stride_vb + i_hk * stride_vh + o_n[:, None] * stride_vt + o_d[None, :]
    b_k = tl.load(p_k, mask=m_nd, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_nd, other=0.0)  # [BN, BD]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    offset = t_k - t_q
    lo = 0
    if CAUSAL:
        # Query i sees key j iff i >= j - offset: earlier query blocks contribute nothing to these keys.
        lo = tl.maximum(i_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    # GQA: every query head of this KV head's group adds its contribution here, in registers.
    for i_rep in range(n_rep):
        i_hq = i_hk * n_rep + i_rep
        p_q = q + i_b * stride_qb + i_hq * stride_qh + o_d[None, :]  # [1, BD]: row 0 of this query head
        p_do = do + i_b * stride_dob + i_hq * stride_doh + o_d[None, :]  # [1, BD]
        o_stats = (i_b * h_q + i_hq) * t_q  # this query head's row 0 in lse and delta
        for start_m in range(lo, t_q, BLOCK_M):
            o_m = start_m + tl.arange(0, BLOCK_M)
            m_m = o_m < t_q
            m_md = m_m[:, None] & m_d[None, :]  # [BM, BD]
            b_q = tl.load(p_q + o_m[:, None] * stride_qt, mask=m_md, other=0.0)  # [BM, BD]
            b_do = tl.load(p_do + o_m[:, None] * stride_dot, mask=m_md, other=0.0)  # [BM, BD]
            b_lse = tl.load(lse + o_stats + o_m, mask=m_m, other=float("inf"))  # [BM]
            b_delta = tl.load(delta + o_stats + o_m, mask=m_m, other=0.0)  # [BM]
            # Transposed scores (keys x queries) so dK and dV come out of plain dots.
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * scale_log2  # [BN, BM]
            m_st = m_n[:, None] & m_m[None, :]  # [BN, BM]
            if CAUSAL:
                m_st = m_st & (o_n[:, None] <= o_m[None, :] + offset)
            b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)  # [BN, BM]
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BN, BM]
            b_dst = b_pt * (b_dpt - b_delta[None, :])  # [BN, BM]
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)

    b_dk = b_dk * sm_scale
    o_out = i_b * stride_dkb + i_hk * stride_dkh + o_n[:, None] * stride_dkt + o_d[None, :]  # [BN, BD]
    # dk and dv are allocated alike, so they share strides.
    tl.store(dk + o_out, b_dk.to(dk.dtype.element_ty), mask=m_nd)
    tl.store(dv + o_out, b_dv.to(dv.dtype.element_ty), mask=m_nd)


@triton.autotune(
    configs=_autotune_configs([(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2)]),
    key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim},
)
@triton.jit
def _attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    t_q, t_k, h_q, n_rep, head_dim, sm_scale, scale_log2,
    t_q_bucket, t_k_bucket,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one query block of one (batch, query head), by its own pass over the key blocks it sees."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b, i_hq, i_hk, o_m, o_d, m_m, m_d, hi = _query_block(i_m, i_bh, t_q, t_k, h_q, n_rep, head_dim,
                                                           CAUSAL, BLOCK_D, BLOCK_M)
    m_md = m_m[:, None] & m_d[None, :]  # [BM, BD]
    p_q = q + i_b * stride_qb + i_hq * stride_qh + o_m[:, None] * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_md, other=0.0)  # [BM, BD]
    p_do = do + i_b * stride_dob + i_hq * stride_doh + o_m[:, None] * stride_dot + o_d[None, :]
    b_do = tl.load(p_do, mask=m_md, other=0.0)  # [BM, BD]
    b_lse = tl.load(lse + i_bh * t_q + o_m, mask=m_m, other=float("inf"))  # [BM]
    b_delta = tl.load(delta + i_bh * t_q + o_m, mask=m_m, other=0.0)  # [BM]
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_k = k + i_b * stride_kb + i_hk * stride_kh + o_d[None, :]  # [1, BD]: row 0 of this head's keys
    p_v = v + i_b * stride_vb + i_hk * stride_vh + o_d[None, :]  # [1, BD]

    for start_n in range(0, hi, BLOCK_N):
        b_k, b_v, b_s, m_s = _key_block_scores(b_q, p_k, p_v, start_n, o_m, m_m, m_d, stride_kt, stride_vt, t_q,
                                               t_k, scale_log2, CAUSAL, DOT_PRECISION, BLOCK_N)
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BM, BN]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])  # [BM, BN]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)

    b_dq = b_dq * sm_scale
    p_dq = dq + i_b * stride_dqb + i_hq * stride_dqh + o_m[:, None] * stride_dqt + o_d[None, :]  # [BM, BD]
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_md)


def _launch_args(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    """The autotune key and the meta-parameters every attention kernel takes (all but the preprocess)."""
    t_q, t_k, d = q.shape[1], k.shape[1], q.shape[3]
    return {
        "t_q_bucket": triton.next_power_of_2(t_q), "t_k_bucket": triton.next_power_of_2(t_k), "CAUSAL": causal,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        # fp32 inputs: full-precision dots on a GPU too (tl.dot would use TF32 otherwise).
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns O (B, Tq, Hq, D) and the base-2 LSE (B, Hq, Tq) in fp32."""
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    batch, t_q, h_q, d = q.shape
    t_k, h_k = k.shape[1], k.shape[2]
    o = empty_output((batch, t_q, h_q, d), q.dtype, q.device)
    lse = empty_output((batch, h_q, t_q), torch.float32, q.device)
    _attn_fwd_kernel[lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), batch * h_q)](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        t_q, t_k, h_q, h_q // h_k, d, sm_scale * LOG2_E,
        **_launch_args(q, k, causal),
    )
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels: returns dq, dk, dv shaped like q, k, v."""
    do, q, k, v, o = (unit_last_stride(t) for t in (do, q, k, v, o))
    batch, t_q, h_q, d = q.shape
    t_k, h_k = k.shape[1], k.shape[2]
    n_rep = h_q // h_k
    args = _launch_args(q, k, causal)

    delta = empty_output((batch, h_q, t_q), torch.float32, q.device)
    pre_block_m = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(t_q, pre_block_m), batch * h_q)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        t_q, h_q, d, BLOCK_M=pre_block_m, BLOCK_D=args["BLOCK_D"],
    )

    dk = empty_output(tuple(k.shape), k.dtype, k.device)
    dv = empty_output(tuple(v.shape), v.dtype, v.device)
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]), batch * h_k)](
        q, k, v, do, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        t_q, t_k, h_q, h_k, n_rep, d, sm_scale, sm_scale * LOG2_E,
        **args,
    )

    dq = empty_output(tuple(q.shape), q.dtype, q.device)
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), batch * h_q)](
        q, k, v, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        t_q, t_k, h_q, n_rep, d, sm_scale, sm_scale * LOG2_E,
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


def flash_attn_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                      sm_scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 on (B, T, H, D) tensors with native GQA; differentiable."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if v is k:
        v = v.view_as(v)  # torch.compile cannot trace autograd.Function.apply given one tensor twice; a view it can
    return FlashAttnFunction.apply(q, k, v, causal, float(sm_scale))

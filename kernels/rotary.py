"""Rotary position embedding in Triton, rotate-half convention (Hugging Face Llama), never in place.

x (B, T, H, D) with any strides on B, T, H (a view of a fused projection is read in place); cos and sin (T, D // 2)
fp32, row t for the token at position t of x: to decode at an offset, pass the rows of the cache positions.
  out[..., :D/2] = x1 * cos - x2 * sin
  out[..., D/2:] = x2 * cos + x1 * sin
The backward is the same rotation by the opposite angle (sin negated), so one kernel does both.

`apply_rotary_qk` rotates q and k in one launch: a program takes a tile of tokens of one sequence and loops over
all the heads of q then of k, loading cos/sin once per token. Its cos/sin may also be per token, (B, T, D // 2)
(positions restarting per document). `apply_rotary` keeps the earlier kernel, a block of (token, head) rows per
program.
"""

import torch
import triton
import triton.language as tl

from kernels._common import elements_per_program, empty_output, unit_last_stride


@triton.jit
def _rotary_kernel(
    x, cos, sin, out,
    stride_xb, stride_xt, stride_xh,
    stride_cos, n_rows, t, h, half,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate BLOCK_R rows, each one (batch, token, head) vector of D elements, into the contiguous (B, T, H, D) out."""
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    o_d = tl.arange(0, BLOCK_HALF)  # [BHALF]
    m_r = o_r < n_rows
    m_d = o_d < half
    m_rd = m_r[:, None] & m_d[None, :]  # [BR, BHALF]
    # Each row's batch, token and head.
    o_b = o_r // (t * h)
    o_t = (o_r // h) % t
    o_h = o_r % h

    p_x1 = x + (o_b * stride_xb + o_t * stride_xt + o_h * stride_xh)[:, None] + o_d[None, :]  # [BR, BHALF]
    b_x1 = tl.load(p_x1, mask=m_rd, other=0.0).to(tl.float32)
    b_x2 = tl.load(p_x1 + half, mask=m_rd, other=0.0).to(tl.float32)
    o_cs = o_t[:, None] * stride_cos + o_d[None, :]  # [BR, BHALF]
    b_cos = tl.load(cos + o_cs, mask=m_rd, other=0.0).to(tl.float32)
    b_sin = tl.load(sin + o_cs, mask=m_rd, other=0.0).to(tl.float32)
    if BACKWARD:
        b_sin = -b_sin  # the transpose of a rotation is the rotation by -angle

    b_y1 = b_x1 * b_cos - b_x2 * b_sin
    b_y2 = b_x2 * b_cos + b_x1 * b_sin
    p_y1 = out + o_r[:, None] * (2 * half) + o_d[None, :]  # [BR, BHALF]
    tl.store(p_y1, b_y1.to(out.dtype.element_ty), mask=m_rd)
    tl.store(p_y1 + half, b_y2.to(out.dtype.element_ty), mask=m_rd)


@triton.jit
def _rotate_heads(x, out, b_cos, b_sin, o_t, o_d, m_td, i_b, stride_xb, stride_xt, stride_xh, t, n_heads, half):
    """Rotate the heads of one tile of tokens of x (one sequence) into the contiguous out."""
    for i_h in range(n_heads):
        p_x1 = x + i_b * stride_xb + i_h * stride_xh + o_t[:, None] * stride_xt + o_d[None, :]  # [BT, BHALF]
        b_x1 = tl.load(p_x1, mask=m_td, other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x1 + half, mask=m_td, other=0.0).to(tl.float32)
        p_y1 = out + ((i_b * t + o_t[:, None]) * n_heads + i_h) * (2 * half) + o_d[None, :]  # [BT, BHALF]
        tl.store(p_y1, (b_x1 * b_cos - b_x2 * b_sin).to(out.dtype.element_ty), mask=m_td)
        tl.store(p_y1 + half, (b_x2 * b_cos + b_x1 * b_sin).to(out.dtype.element_ty), mask=m_td)


@triton.jit
def _rotary_qk_kernel(
    q, k, cos, sin, q_out, k_out,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_cb, stride_ct, t, h_q, h_k, half,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate BLOCK_T tokens of sequence i_b, every head of q and of k, with cos/sin loaded once."""
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    o_d = tl.arange(0, BLOCK_HALF)  # [BHALF]
    m_td = (o_t < t)[:, None] & (o_d < half)[None, :]  # [BT, BHALF]
    o_cs = i_b * stride_cb + o_t[:, None] * stride_ct + o_d[None, :]  # [BT, BHALF]
    b_cos = tl.load(cos + o_cs, mask=m_td, other=0.0).to(tl.float32)
    b_sin = tl.load(sin + o_cs, mask=m_td, other=0.0).to(tl.float32)
    if BACKWARD:
        b_sin = -b_sin
    _rotate_heads(q, q_out, b_cos, b_sin, o_t, o_d, m_td, i_b, stride_qb, stride_qt, stride_qh, t, h_q, half)
    _rotate_heads(k, k_out, b_cos, b_sin, o_t, o_d, m_td, i_b, stride_kb, stride_kt, stride_kh, t, h_k, half)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the one-launch rotation of q and k (by -angle when backward) into new contiguous tensors."""
    q, k = unit_last_stride(q), unit_last_stride(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, t, h_q, d = q.shape
    half = d // 2
    q_out = empty_output(tuple(q.shape), q.dtype, q.device)
    k_out = empty_output(tuple(k.shape), k.dtype, k.device)
    if batch * t == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    # On a GPU, about 1k pairs per head step (16 tokens at head dim 128), a few warps.
    block_t = min(triton.next_power_of_2(t), max(1, elements_per_program(1024) // block_half))
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    _rotary_qk_kernel[(triton.cdiv(t, block_t), batch)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        stride_cb, cos.stride(-2), t, h_q, k.shape[2], half,
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=4,
    )
    return q_out, k_out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Launch the rotation (by -angle when backward) into a new contiguous tensor shaped like x."""
    x = unit_last_stride(x)
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, t, h, d = x.shape
    half = d // 2
    out = empty_output((batch, t, h, d), x.dtype, x.device)
    n_rows = batch * t * h
    if n_rows == 0:
        return out
    block_half = triton.next_power_of_2(half)
    # On a GPU, about 2k pairs per program.
    block_r = max(1, elements_per_program(2048) // block_half)
    _rotary_kernel[(triton.cdiv(n_rows, block_r),)](
        x, cos, sin, out,
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0), n_rows, t, h, half,
        BACKWARD=backward, BLOCK_R=block_r, BLOCK_HALF=block_half, num_warps=4,
    )
    return out


def rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Launch the rotation: returns a new contiguous tensor shaped like x."""
    return _rotate(x, cos, sin, backward=False)


def rotary_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Launch the inverse rotation of the incoming gradient."""
    return _rotate(dy, cos, sin, backward=True)


@torch.library.custom_op("geb::rotary_fwd", mutates_args=())
def _rotary_fwd_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotary_fwd(x, cos, sin)


@_rotary_fwd_op.register_fake
def _(x, cos, sin):
    """Output shape for tracing: like x."""
    return x.new_empty(x.shape)


@torch.library.custom_op("geb::rotary_bwd", mutates_args=())
def _rotary_bwd_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotary_bwd(dy, cos, sin)


@_rotary_bwd_op.register_fake
def _(dy, cos, sin):
    """Output shape for tracing: like dy."""
    return dy.new_empty(dy.shape)


class RotaryFunction(torch.autograd.Function):
    """Autograd glue: saves cos and sin only; no gradient flows to them (fixed fp32 tables)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.geb.rotary_fwd(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return torch.ops.geb.rotary_bwd(dy, cos, sin), None, None


@torch.library.custom_op("geb::rotary_qk_fwd", mutates_args=())
def _rotary_qk_fwd_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rotate_qk(q, k, cos, sin)


@_rotary_qk_fwd_op.register_fake
def _(q, k, cos, sin):
    """Output shapes for tracing: like q and k."""
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("geb::rotary_qk_bwd", mutates_args=())
def _rotary_qk_bwd_op(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rotate_qk(dq, dk, cos, sin, backward=True)


@_rotary_qk_bwd_op.register_fake
def _(dq, dk, cos, sin):
    """Output shapes for tracing: like dq and dk."""
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


class RotaryQKFunction(torch.autograd.Function):
    """Autograd glue of the one-launch q/k rotation: saves cos and sin only."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.geb.rotary_qk_fwd(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.geb.rotary_qk_bwd(dq, dk, cos, sin)
        return dq, dk, None, None


def apply_rotary_qk_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q (B, T, Hq, D) and k (B, T, Hk, D) in one launch; new tensors."""
    return RotaryQKFunction.apply(q, k, cos, sin)


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x (B, T, H, D) by cos/sin (T, D // 2); returns a new tensor."""
    return RotaryFunction.apply(x, cos, sin)

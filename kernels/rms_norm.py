"""Fused RMSNorm in Triton: y = x * rstd * w over the last dimension, statistics in fp32; and the residual add
fused in front of it, (y, s) = (rms_norm(x + residual) * w, x + residual), as between the blocks of a pre-norm model.

Forward saves rstd (fp32, one per row). Backward computes dX row-wise and dW as per-program fp32 partial sums
(one row of `dw_partial` per program) reduced afterwards in fp32: no atomics, so dW is deterministic. With the
residual add, the gradient reaching the sum s directly (ds) is added to dX, and dX is also d residual.
Any hidden size: a row is one block of next_power_of_2(H) columns, masked, held in registers.

Two layouts of the forward grid (LAYOUT, env GEB_NORM_LAYOUT read at import): "row" (default) gives a program one
row when rows are long (>= 1024 columns) and a few when short, warps growing with the row; "tile" is the earlier
choice of ~4096 elements per program with 4-16 warps. Both are tested; which is faster is a GPU measurement.
"""

import os

import torch
import triton
import triton.language as tl

from kernels._common import elements_per_program, empty_output, unit_last_stride

MAX_FUSED_SIZE = 65536
LAYOUTS = ("row", "tile")
LAYOUT = os.environ.get("GEB_NORM_LAYOUT", "row")
if LAYOUT not in LAYOUTS:
    raise ValueError(f"GEB_NORM_LAYOUT is {LAYOUT!r} but must be one of {LAYOUTS}")


@triton.jit
def _rms_norm_fwd_kernel(
    x, res, s, w, y, rstd,
    stride_x, stride_res, stride_s, stride_y,
    n_rows, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """y and rstd of BLOCK_R rows of x (of s = x + res, also stored, with HAS_RES)."""
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    o_h = tl.arange(0, BLOCK_H)  # [BH]
    m_r = o_r < n_rows
    m_h = o_h < n_cols
    m_rh = m_r[:, None] & m_h[None, :]  # [BR, BH]

    p_x = x + o_r[:, None] * stride_x + o_h[None, :]
    b_x = tl.load(p_x, mask=m_rh, other=0.0).to(tl.float32)  # [BR, BH]
    if HAS_RES:
        p_res = res + o_r[:, None] * stride_res + o_h[None, :]
        b_s = (b_x + tl.load(p_res, mask=m_rh, other=0.0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + o_r[:, None] * stride_s + o_h[None, :], b_s, mask=m_rh)
        b_x = b_s.to(tl.float32)  # normalize the sum as stored, as the unfused ops would
    b_w = tl.load(w + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BH]
    # Masked columns load 0, so the sum of squares is over the real columns only.
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, 1) / n_cols + eps)  # [BR]
    b_y = b_x * b_rstd[:, None] * b_w[None, :]
    p_y = y + o_r[:, None] * stride_y + o_h[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_rh)
    tl.store(rstd + o_r, b_rstd, mask=m_r)


@triton.jit
def _rms_norm_bwd_kernel(
    dy, ds, x, w, rstd, dx, dw_partial,
    stride_dy, stride_ds, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dx (+ ds with HAS_DS) of a contiguous slab of rows, and that slab's fp32 partial of dw (a row of dw_partial)."""
    i_p = tl.program_id(0)
    o_h = tl.arange(0, BLOCK_H)  # [BH]
    m_h = o_h < n_cols
    b_w = tl.load(w + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BH]
    b_dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_start = i_p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start_r in range(row_start, row_end, BLOCK_R):
        o_r = start_r + tl.arange(0, BLOCK_R)  # [BR]
        m_r = o_r < row_end
        m_rh = m_r[:, None] & m_h[None, :]  # [BR, BH]
        p_dy = dy + o_r[:, None] * stride_dy + o_h[None, :]
        b_dy = tl.load(p_dy, mask=m_rh, other=0.0).to(tl.float32)  # [BR, BH]
        p_x = x + o_r[:, None] * stride_x + o_h[None, :]
        b_x = tl.load(p_x, mask=m_rh, other=0.0).to(tl.float32)  # [BR, BH]
        b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.0)  # [BR]
        b_xhat = b_x * b_rstd[:, None]
        b_dyw = b_dy * b_w[None, :]
        # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), the mean taken over the real columns.
        b_dx = b_rstd[:, None] * (b_dyw - b_xhat * (tl.sum(b_dyw * b_xhat, 1) / n_cols)[:, None])
        if HAS_DS:
            b_dx += tl.load(ds + o_r[:, None] * stride_ds + o_h[None, :], mask=m_rh, other=0.0).to(tl.float32)
        p_dx = dx + o_r[:, None] * stride_dx + o_h[None, :]
        tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=m_rh)
        b_dw += tl.sum(b_dy * b_xhat, 0)
    tl.store(dw_partial + i_p * n_cols + o_h, b_dw, mask=m_h)


def _block_sizes(n_cols: int, layout: str = LAYOUT) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) of a layout (module docstring); "tile" takes bigger programs when interpreting."""
    block_h = triton.next_power_of_2(n_cols)
    if block_h > MAX_FUSED_SIZE:
        raise ValueError(f"x.shape[-1] ({n_cols}) must be at most {MAX_FUSED_SIZE} for the Triton RMSNorm")
    if layout == "tile":
        block_r = max(1, min(64, elements_per_program(4096) // block_h))
        num_warps = 4 if block_h * block_r <= 4096 else 8 if block_h * block_r <= 16384 else 16
        return block_r, block_h, num_warps
    # "row": a whole row per program in registers, ~8-16 fp32 values per thread (128-bit loads of bf16).
    block_r = max(1, 1024 // block_h)
    num_warps = max(1, min(16, block_h * block_r // 256))
    return block_r, block_h, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as (rows, H) with unit column stride (copies only if needed)."""
    return unit_last_stride(t.reshape(-1, t.shape[-1]))


def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 layout: str = LAYOUT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: y (shaped like x, x's dtype), rstd (rows,) fp32, and s = x + residual (or x)."""
    x2, w = _rows(x), w.contiguous()
    n_rows, n_cols = x2.shape
    block_r, block_h, num_warps = _block_sizes(n_cols, layout)
    y = empty_output((n_rows, n_cols), x.dtype, x.device)
    rstd = empty_output((n_rows,), torch.float32, x.device)
    res2 = x2 if residual is None else _rows(residual)
    s = x2 if residual is None else empty_output((n_rows, n_cols), x.dtype, x.device)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, res2, s, w, y, rstd, x2.stride(0), res2.stride(0), s.stride(0), y.stride(0), n_rows, n_cols, eps,
        HAS_RES=residual is not None, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return y.view(x.shape), rstd, (x if residual is None else s.view(x.shape))


def _num_programs(n_rows: int, block_r: int, device: torch.device) -> int:
    """How many backward programs (dw partials): a few per SM on a GPU, a few in all when interpreting."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: programs run one after another, few is fastest
    return max(1, min(target, triton.cdiv(n_rows, block_r)))


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                 ds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: dx (like x; plus ds when given) and dw (like w), dw summed in fp32 from partials."""
    x2, dy2, w = _rows(x), _rows(dy), w.contiguous()
    ds2 = dy2 if ds is None else _rows(ds)
    n_rows, n_cols = x2.shape
    block_r, block_h, num_warps = _block_sizes(n_cols, "tile")
    n_programs = _num_programs(n_rows, block_r, x.device)
    # Whole BLOCK_R steps per program, so a program's rows never straddle another's.
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_programs), block_r) * block_r
    n_programs = triton.cdiv(n_rows, rows_per_program)
    dx = empty_output((n_rows, n_cols), x.dtype, x.device)
    dw_partial = empty_output((n_programs, n_cols), torch.float32, x.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2, ds2, x2, w, rstd, dx, dw_partial,
        dy2.stride(0), ds2.stride(0), x2.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DS=ds is not None, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )
    return dx.view(x.shape), dw_partial.sum(0).to(w.dtype)


@torch.library.custom_op("geb::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd, _ = rms_norm_fwd(x, w, eps)
    return y, rstd


@_rms_norm_fwd_op.register_fake
def _(x, w, eps):
    """Output shapes for tracing: y like x, rstd one fp32 per row."""
    return x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


@torch.library.custom_op("geb::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, w, rstd)


@_rms_norm_bwd_op.register_fake
def _(dy, x, w, rstd):
    """Output shapes for tracing: dx like x, dw like w."""
    return x.new_empty(x.shape), w.new_empty(w.shape)


@torch.library.custom_op("geb::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, w, eps, residual)


@_add_rms_norm_fwd_op.register_fake
def _(x, residual, w, eps):
    """Output shapes for tracing: y and s like x, rstd one fp32 per row."""
    return x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32), x.new_empty(x.shape)


@torch.library.custom_op("geb::add_rms_norm_bwd", mutates_args=())
def _add_rms_norm_bwd_op(dy: torch.Tensor, ds: torch.Tensor, s: torch.Tensor, w: torch.Tensor,
                         rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, s, w, rstd, ds)


@_add_rms_norm_bwd_op.register_fake
def _(dy, ds, s, w, rstd):
    """Output shapes for tracing: d(sum) like s, dw like w."""
    return s.new_empty(s.shape), w.new_empty(w.shape)


class RMSNormFunction(torch.autograd.Function):
    """Autograd glue: saves x, w and rstd (fp32), not the normalized output."""

    @staticmethod
    def forward(ctx, x, w, eps):
        y, rstd = torch.ops.geb.rms_norm_fwd(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = torch.ops.geb.rms_norm_bwd(dy, x, w, rstd)
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    """Autograd glue: saves s = x + residual, w and rstd; x and residual get the same gradient."""

    @staticmethod
    def forward(ctx, x, residual, w, eps):
        y, rstd, s = torch.ops.geb.add_rms_norm_fwd(x, residual, w, eps)
        ctx.save_for_backward(s, w, rstd)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, w, rstd = ctx.saved_tensors
        if ds is None:  # s unused downstream
            ds = torch.zeros_like(s)
        dsum, dw = torch.ops.geb.add_rms_norm_bwd(dy, ds, s, w, rstd)
        return dsum, dsum, dw, None


def rms_norm_triton(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension with fp32 statistics; differentiable in x and w."""
    return RMSNormFunction.apply(x, w, float(eps))


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * w, x + residual); differentiable in x, residual and w."""
    return AddRMSNormFunction.apply(x, residual, w, float(eps))

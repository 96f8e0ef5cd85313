"""Fused SwiGLU in Triton: y = silu(gate) * up, math in fp32.

The forward stores only y; the backward reloads gate and up and recomputes sigmoid(gate) instead of saving it:
  d_up   = dy * silu(gate)
  d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
"""

import torch
import triton
import triton.language as tl

from kernels._common import elements_per_program, empty_output

# On a GPU, 1k elements per program is bandwidth-bound already.
BLOCK = elements_per_program(1024)


@triton.jit
def _swiglu_fwd_kernel(gate, up, y, n, BLOCK: tl.constexpr):
    """y = silu(gate) * up over one block of the flattened tensors."""
    o_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n
    b_gate = tl.load(gate + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_up = tl.load(up + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_y = b_gate * tl.sigmoid(b_gate) * b_up
    tl.store(y + o_n, b_y.to(y.dtype.element_ty), mask=m_n)


@triton.jit
def _swiglu_bwd_kernel(dy, gate, up, dgate, dup, n, BLOCK: tl.constexpr):
    """dgate and dup over one block of the flattened tensors."""
    o_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n
    b_dy = tl.load(dy + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_gate = tl.load(gate + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_up = tl.load(up + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_sig = tl.sigmoid(b_gate)  # recomputed: cheaper than a saved tensor's memory traffic
    b_silu = b_gate * b_sig
    b_dup = b_dy * b_silu
    b_dgate = b_dy * b_up * b_sig * (1.0 + b_gate * (1.0 - b_sig))
    tl.store(dgate + o_n, b_dgate.to(dgate.dtype.element_ty), mask=m_n)
    tl.store(dup + o_n, b_dup.to(dup.dtype.element_ty), mask=m_n)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on flattened contiguous inputs; returns a new tensor shaped like gate."""
    gate, up = gate.contiguous(), up.contiguous()
    y = empty_output(tuple(gate.shape), gate.dtype, gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: returns (d_gate, d_up), new tensors."""
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate = empty_output(tuple(gate.shape), gate.dtype, gate.device)
    dup = empty_output(tuple(up.shape), up.dtype, up.device)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=4)
    return dgate, dup


@torch.library.custom_op("geb::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    """Output shape for tracing: like gate."""
    return gate.new_empty(gate.shape)


@torch.library.custom_op("geb::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    """Output shapes for tracing: dgate like gate, dup like up."""
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd glue: saves gate and up only; sigmoid is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.ops.geb.swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.geb.swiglu_bwd(dy, gate, up)
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one fused kernel; differentiable in both inputs."""
    if up is gate:
        up = up.view_as(up)  # torch.compile cannot trace autograd.Function.apply given one tensor twice; a view it can
    return SwiGLUFunction.apply(gate, up)

"""Linear cross-entropy without the (tokens, vocab) logits: loss(x @ weight.T, targets), chunked over tokens.

Tokens go in chunks whose logits are about the size of the hidden states. Per chunk: one matmul to the chunk's
logits, then one kernel (Triton, or the same math in PyTorch for impl="torch") computes each row's log-sum-exp and
loss in fp32 and overwrites the logits with their gradient, softmax - onehot, scaled; then dX of the chunk and
dW += grad.T @ x (dW accumulated in fp32, chunk after chunk: deterministic).

With reduction "mean" or "sum" the gradients are computed in the forward (the loss is a scalar, so the backward
only scales them). With reduction "none" the upstream gradient differs per token: the forward computes the losses
only and the backward recomputes each chunk's logits, scaling every row by its own upstream gradient.
Optional softcap: logits z -> softcap * tanh(z / softcap) before the softmax (Gemma 2).
"""

import torch
import triton
import triton.language as tl

from kernels._common import INTERPRET, empty_output


@triton.jit
def _ce_kernel(
    logits, targets, scale, loss,
    stride_l, stride_scale, n_cols, ignore_index, softcap,
    WITH_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Loss of one row of logits; with WITH_GRAD, the row overwritten by scale * d loss / d logits."""
    i_r = tl.program_id(0).to(tl.int64)
    p_row = logits + i_r * stride_l
    b_t = tl.load(targets + i_r)
    if b_t == ignore_index:
        tl.store(loss + i_r, 0.0)
        if WITH_GRAD:
            for start_v in range(0, n_cols, BLOCK_V):
                o_v = start_v + tl.arange(0, BLOCK_V)  # [BV]
                tl.store(p_row + o_v, tl.zeros([BLOCK_V], dtype=tl.float32).to(logits.dtype.element_ty),
                         mask=o_v < n_cols)
        return

    # Pass 1: online max and sum of exponentials over the row, in fp32.
    m = float("-inf")
    s = 0.0
    for start_v in range(0, n_cols, BLOCK_V):
        o_v = start_v + tl.arange(0, BLOCK_V)  # [BV]
        m_v = o_v < n_cols
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # softcap * tanh(z / softcap); columns past the row stay -inf
            b_z = tl.where(m_v, softcap * (2.0 * tl.sigmoid(2.0 * b_z / softcap) - 1.0), float("-inf"))
        m_new = tl.maximum(m, tl.max(b_z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(b_z - m_new), 0)
        m = m_new
    b_lse = m + tl.log(s)
    b_zt = tl.load(p_row + b_t).to(tl.float32)
    if HAS_SOFTCAP:
        b_zt = softcap * (2.0 * tl.sigmoid(2.0 * b_zt / softcap) - 1.0)
    tl.store(loss + i_r, b_lse - b_zt)

    # Pass 2: the gradient (softmax - onehot) * scale, written over the logits.
    if WITH_GRAD:
        b_scale = tl.load(scale + i_r * stride_scale).to(tl.float32)
        for start_v in range(0, n_cols, BLOCK_V):
            o_v = start_v + tl.arange(0, BLOCK_V)  # [BV]
            m_v = o_v < n_cols
            b_z = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                b_z = softcap * (2.0 * tl.sigmoid(2.0 * b_z / softcap) - 1.0)
            b_g = tl.exp(b_z - b_lse) - tl.where(o_v == b_t, 1.0, 0.0)
            if HAS_SOFTCAP:
                b_g = b_g * (1.0 - (b_z / softcap) * (b_z / softcap))  # d softcap*tanh(z/softcap) / dz
            tl.store(p_row + o_v, (b_g * b_scale).to(logits.dtype.element_ty), mask=m_v)


def _ce_chunk_triton(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor,
                     ignore_index: int, softcap: float, with_grad: bool) -> None:
    """Launch the kernel over a chunk: loss (rows,) written; logits overwritten by their gradient when with_grad."""
    n_rows, n_cols = logits.shape
    block_v = min(triton.next_power_of_2(n_cols), 16384 if INTERPRET else 4096)
    _ce_kernel[(n_rows,)](
        logits, targets, scale, loss,
        # One scale for every row (stride 0), or one per row.
        logits.stride(0), 0 if scale.numel() == 1 else scale.stride(0), n_cols, ignore_index, softcap,
        WITH_GRAD=with_grad, HAS_SOFTCAP=softcap > 0, BLOCK_V=block_v, num_warps=8,
    )


def _ce_chunk_torch(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor,
                    ignore_index: int, softcap: float, with_grad: bool) -> None:
    """The kernel's math in PyTorch (fp32, or fp64 for fp64 logits), chunk-sized temporaries only."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, -1)
    loss.copy_(torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], 0.0))
    if with_grad:
        g = torch.exp(z - lse[:, None])
        g[torch.arange(len(safe), device=g.device), safe] -= 1.0
        if softcap > 0:
            g *= 1.0 - (z / softcap) ** 2
        g *= torch.where(valid, scale, 0.0)[:, None]
        logits.copy_(g)


# At least this many tokens per chunk: each chunk reads and writes all of dW once, so tiny chunks are slow (on this
# CPU, 256-token chunks ran the loss + backward ~2x faster than 32-token ones at 4,096 tokens, d 512, vocab 64,896),
# and below 16 rows the products become matrix-vector ones, summed less accurately over the vocabulary on CPU.
# Tests lower it (>= 16) to see several chunks at small sizes.
MIN_CHUNK = 256


def chunk_tokens(n_tokens: int, d: int, vocab: int) -> int:
    """Tokens per chunk: a chunk's logits about the size of all the hidden states (x), a power of two, at least
    MIN_CHUNK."""
    by_size = max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(n_tokens * d, vocab)))
    return min(triton.next_power_of_2(max(1, n_tokens)), by_size)


def _chunked(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
             softcap: float, with_grad: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses (N,) fp32 and, with with_grad, dx (like x) and dw (like w) of sum(scale * loss)."""
    n, d = x.shape
    chunk = chunk_tokens(n, d, w.shape[0])
    ce_chunk = _ce_chunk_triton if use_triton else _ce_chunk_torch
    loss = empty_output((n,), torch.float32, x.device)
    dx = empty_output((n, d), x.dtype, x.device) if with_grad else x.new_empty(0)
    dw_dtype = torch.promote_types(w.dtype, torch.float32)
    dw = torch.zeros(w.shape, dtype=dw_dtype, device=w.device) if with_grad else None
    per_row = scale.numel() > 1
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x_c = x[start:end]
        logits = x_c @ w.t()  # [chunk, vocab], in x's dtype
        ce_chunk(logits, targets[start:end], scale[start:end] if per_row else scale, loss[start:end],
                 ignore_index, softcap, with_grad)
        if with_grad:
            torch.mm(logits, w, out=dx[start:end])
            if dw.dtype == x.dtype:  # fp32 (or fp64): accumulate in place, one pass over dw per chunk
                dw.addmm_(logits.t(), x_c)
            else:  # the chunk's product in the inputs' dtype, the running sum over chunks in fp32
                dw.add_(logits.t() @ x_c)
    return loss, dx, (w.new_empty(0) if dw is None else dw.to(w.dtype))


def _mean_scale(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 / the number of targets not ignored (1 when all are), as a (1,) fp32 tensor."""
    return 1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32).reshape(1)


@torch.library.custom_op("geb::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd_op(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float,
                      reduction: str, with_grad: bool, use_triton: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if reduction == "mean":
        scale = _mean_scale(targets, ignore_index)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=x.device)
    return _chunked(x, w, targets, scale, ignore_index, softcap, with_grad and reduction != "none", use_triton)


@_linear_ce_fwd_op.register_fake
def _(x, w, targets, ignore_index, softcap, reduction, with_grad, use_triton):
    """Output shapes for tracing: losses (N,) fp32; dx, dw like x, w (empty without gradients)."""
    grads = with_grad and reduction != "none"
    return (x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty(x.shape if grads else (0,)),
            w.new_empty(w.shape if grads else (0,)))


@torch.library.custom_op("geb::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd_op(dloss: torch.Tensor, x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int, softcap: float, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = dloss.to(torch.float32).contiguous()
    _, dx, dw = _chunked(x, w, targets, scale, ignore_index, softcap, True, use_triton)
    return dx, dw


@_linear_ce_bwd_op.register_fake
def _(dloss, x, w, targets, ignore_index, softcap, use_triton):
    """Output shapes for tracing: dx like x, dw like w."""
    return x.new_empty(x.shape), w.new_empty(w.shape)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd glue. mean/sum: saves dx and dw from the forward; none: saves x, w, targets and recomputes."""

    @staticmethod
    def forward(ctx, x, w, targets, ignore_index, reduction, softcap, with_grad, use_triton):
        losses, dx, dw = torch.ops.geb.linear_ce_fwd(x, w, targets, ignore_index, softcap, reduction, with_grad,
                                                     use_triton)
        ctx.reduction, ctx.ignore_index, ctx.softcap, ctx.use_triton = reduction, ignore_index, softcap, use_triton
        if reduction == "none":
            ctx.save_for_backward(x, w, targets)
            return losses
        ctx.save_for_backward(dx, dw)
        total = losses.sum()
        return total * _mean_scale(targets, ignore_index)[0] if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction == "none":
            x, w, targets = ctx.saved_tensors
            dx, dw = torch.ops.geb.linear_ce_bwd(grad, x, w, targets, ctx.ignore_index, ctx.softcap, ctx.use_triton)
        else:
            dx, dw = ctx.saved_tensors
            dx, dw = dx * grad.to(dx.dtype), dw * grad.to(dw.dtype)
        return dx, dw, None, None, None, None, None, None


def linear_cross_entropy_chunked(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 reduction: str, softcap: float, use_triton: bool) -> torch.Tensor:
    """Cross-entropy of x (N, d) @ w.T (vocab, d) against targets (N,); differentiable in x and w."""
    with_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    return LinearCrossEntropyFunction.apply(x, w, targets, ignore_index, reduction, float(softcap), with_grad,
                                            use_triton)

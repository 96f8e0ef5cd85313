"""Plain PyTorch references for every kernel: the ground truth in tests and the fast path on CPU."""

import torch
import torch.nn.functional as F


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  softmax_scale: float) -> torch.Tensor:
    """Attention on (B, T, H, D) tensors with GQA and bottom-right causal alignment."""
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    t_q, t_k = q.shape[1], k.shape[1]
    if causal and t_q != t_k:
        # SDPA's is_causal aligns top-left; decoding with a cache needs bottom-right (query i sees keys <= i + Tk - Tq).
        o_q = torch.arange(t_q, device=q.device)[:, None]
        o_k = torch.arange(t_k, device=q.device)[None, :]
        mask = o_k <= o_q + (t_k - t_q)
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def _attention_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, causal: bool, softmax_scale: float) -> torch.Tensor:
    """Attention within packed documents (q (total_q, Hq, D), k/v (total_k, Hkv, D)): SDPA on each document alone."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(bounds_q) - 1):
        q_b = q[bounds_q[b] : bounds_q[b + 1]][None]
        k_b, v_b = k[bounds_k[b] : bounds_k[b + 1]][None], v[bounds_k[b] : bounds_k[b + 1]][None]
        if k_b.shape[1] == 0:  # a document without keys attends to nothing: zeros, as the kernel writes
            outs.append(torch.zeros_like(q_b[0]))
            continue
        outs.append(attention_ref(q_b, k_b, v_b, causal, softmax_scale)[0])
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def __getattr__(name: str):
    """attention_varlen_ref: _attention_varlen_ref run eagerly inside a compiled model (one SDPA per document, sizes
    read from the data). Made on first use: torch.compiler.disable imports torch._dynamo, ~1 s that CPU inference's
    start-up, which never needs it, would pay at import."""
    if name != "attention_varlen_ref":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = globals()[name] = torch.compiler.disable(_attention_varlen_ref)
    return fn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 stays fp64 (tests use fp64 inputs as the ground truth)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with (at least) fp32 statistics, returned in x's dtype."""
    x_f = x.to(_compute_dtype(x))
    y = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(x_f.dtype)).to(x.dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), the sum in x's dtype as the unfused ops compute it."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding; x (B, T, H, D), cos/sin (T, D//2) or (B, T, D//2); in (at least) fp32."""
    half = x.shape[-1] // 2
    x_f = x.to(_compute_dtype(x))
    x1, x2 = x_f[..., :half], x_f[..., half:]
    c, s = cos.to(x_f.dtype)[..., None, :], sin.to(x_f.dtype)[..., None, :]  # broadcast over heads (and batch)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rotary_qk_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by the same cos/sin."""
    return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)


def linear_cross_entropy_ref(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                             reduction: str = "mean", softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of the full logits x @ weight.T (in at least fp32) against targets; "mean" over the targets
    not ignored (0 when all are)."""
    logits = F.linear(x, weight).to(_compute_dtype(x))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = targets.reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (flat != ignore_index).sum().clamp(min=1)

"""Public kernel API: each op takes impl="auto" | "triton" | "torch" (auto = Triton on CUDA, reference elsewhere).

`GEB_KERNELS=torch` forces the PyTorch references everywhere. `GEB_AUTOTUNE=0` (read at import) gives each attention
kernel one small config instead of autotuning; `GEB_ATTN_VARIANT=plain|ws|tma|tma_ws` forces one attention variant
(kernels/flash_attn.py). `GEB_KERNELS_POISON=1` NaN-fills kernel outputs (tests).

Files: one per op (`flash_attn`, `rms_norm`, `swiglu`, `rotary`: Triton kernels, launchers, torch.library ops and
autograd glue), `reference` (the PyTorch references), `_common` (what the kernel files share). Names inside the
Triton kernels: pointer arguments and runtime sizes in lowercase, constexpr meta-parameters in UPPER_CASE; `i_`
program indices, `o_` offsets, `m_` masks, `p_` pointers, `b_` blocks of values; `# [BM, BD]` gives a block's shape
in BLOCK_M x BLOCK_D where it is not obvious.
"""

import importlib.util
import os

import torch

from kernels import reference
from kernels._common import INTERPRET

# Triton is optional: without it, impl="auto" and impl="torch" still run the PyTorch references. Imported here,
# before the public functions below, whose names (rms_norm, swiglu) must win over the submodules' of the same name.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    from kernels.cross_entropy import linear_cross_entropy_chunked
    from kernels.flash_attn import MAX_HEAD_DIM, flash_attn_triton, flash_attn_varlen_triton
    from kernels.rms_norm import add_rms_norm_triton, rms_norm_triton
    from kernels.rotary import apply_rotary_qk_triton, apply_rotary_triton
    from kernels.swiglu import swiglu_triton

IMPLS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve(impl: str, **tensors: torch.Tensor) -> str:
    """The implementation to run: "torch" or "triton" (validated: device, interpreter, dtypes)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if os.environ.get("GEB_KERNELS") == "torch":
        return "torch"
    first = next(iter(tensors.values()))
    if impl == "auto":
        usable = first.is_cuda and HAVE_TRITON
        return "triton" if usable and all(t.dtype in _TRITON_DTYPES for t in tensors.values()) else "torch"
    if impl == "triton":
        if not HAVE_TRITON:
            raise ValueError("impl='triton' needs the triton package (pip install triton); impl='torch' does not")
        if not first.is_cuda and not INTERPRET:
            raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before `kernels` is imported")
        for name, t in tensors.items():
            if t.dtype not in _TRITON_DTYPES:
                raise ValueError(f"{name}.dtype is {t.dtype} but impl='triton' needs one of {_TRITON_DTYPES}")
            if t.dtype == torch.bfloat16 and not t.is_cuda:
                raise ValueError(f"{name}.dtype is bfloat16 on CPU, but the Triton interpreter computes bf16 wrongly: "
                                 "use float32/float16 or a GPU")
    return impl


def _same(name: str, value, expected_name: str, expected) -> None:
    """Raise ValueError naming the argument when value != expected."""
    if value != expected:
        raise ValueError(f"{name} is {value} but must match {expected_name} ({expected})")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Raise ValueError naming the argument unless q, k, v have layout's rank (heads in dim -2, head dim last) and
    agree in k/v shape, head dim, dtype and device, with q's heads a multiple of k/v's."""
    ndim = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    _same("k.shape", tuple(k.shape), "v.shape", tuple(v.shape))
    if ndim == 4:
        _same("k batch", k.shape[0], "q batch", q.shape[0])
    _same("k head dim", k.shape[-1], "q head dim", q.shape[-1])
    _same("k.dtype", k.dtype, "q.dtype", q.dtype)
    _same("v.dtype", v.dtype, "q.dtype", q.dtype)
    _same("k.device", k.device, "q.device", q.device)
    _same("v.device", v.device, "q.device", q.device)
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of k/v heads ({k.shape[-2]})")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Attention over q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D) with native GQA; causal mask aligned bottom-right."""
    _check_qkv(q, k, v, "(B, T, H, D)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if _resolve(impl, q=q, k=k, v=v) == "torch":
        return reference.attention_ref(q, k, v, causal, scale)
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) is {q.shape[-1]} but impl='triton' supports 1 to {MAX_HEAD_DIM}")
    return flash_attn_triton(q, k, v, causal, scale)


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_name: str, max_len: int,
                      device: torch.device) -> None:
    """Raise ValueError naming `name` unless it is int32 cumulative lengths from 0 to `total`, none over max_len
    (the values only on CPU)."""
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of >= 2 cumulative lengths, got {cu.dtype} "
                         f"shape {tuple(cu.shape)}")
    _same(f"{name}.device", cu.device, "q.device", device)
    if cu.is_cuda or torch.compiler.is_compiling():
        return  # reading the values stalls the GPU or breaks a compiled graph; eager CPU callers get them checked
    lengths = cu.diff()
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"{name} must rise from 0 to {total} (the packed rows), got {cu.tolist()}")
    if int(lengths.max()) > max_len:
        raise ValueError(f"{max_name} is {max_len} but {name} holds a document of {int(lengths.max())}")


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Attention within packed documents: q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 cumulative lengths
    (FlashAttention-2's varlen convention); document b is rows cu_seqlens[b]:cu_seqlens[b + 1]."""
    _check_qkv(q, k, v, "(total, H, D)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k, q.device)
    _same("cu_seqlens_k documents", cu_seqlens_k.numel(), "cu_seqlens_q documents", cu_seqlens_q.numel())
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if _resolve(impl, q=q, k=k, v=v) == "torch":
        return reference.attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) is {q.shape[-1]} but impl='triton' supports 1 to {MAX_HEAD_DIM}")
    return flash_attn_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension, statistics in fp32."""
    _same("weight.shape", tuple(weight.shape), "x.shape[-1:]", tuple(x.shape[-1:]))
    _same("weight.device", weight.device, "x.device", x.device)
    if _resolve(impl, x=x, weight=weight) == "torch":
        return reference.rms_norm_ref(x, weight, eps)
    return rms_norm_triton(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up."""
    _same("up.shape", tuple(up.shape), "gate.shape", tuple(gate.shape))
    _same("up.dtype", up.dtype, "gate.dtype", gate.dtype)
    _same("up.device", up.device, "gate.device", gate.device)
    if _resolve(impl, gate=gate, up=up) == "torch":
        return reference.swiglu_ref(gate, up)
    return swiglu_triton(gate, up)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rotate-half rotary embedding: x (B, T, H, D), cos/sin (T, D // 2) fp32."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be (B, T, H, D) with even D, got shape {tuple(x.shape)}")
    expected = (x.shape[1], x.shape[3] // 2)
    _same("cos.shape", tuple(cos.shape), "(T, D // 2)", expected)
    _same("sin.shape", tuple(sin.shape), "(T, D // 2)", expected)
    _same("cos.device", cos.device, "x.device", x.device)
    _same("sin.device", sin.device, "x.device", x.device)
    if _resolve(impl, x=x, cos=cos, sin=sin) == "torch":
        return reference.rotary_ref(x, cos, sin)
    return apply_rotary_triton(x, cos, sin)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) in one pass: a pre-norm model's residual add and next norm."""
    _same("residual.shape", tuple(residual.shape), "x.shape", tuple(x.shape))
    _same("residual.dtype", residual.dtype, "x.dtype", x.dtype)
    _same("residual.device", residual.device, "x.device", x.device)
    _same("weight.shape", tuple(weight.shape), "x.shape[-1:]", tuple(x.shape[-1:]))
    _same("weight.device", weight.device, "x.device", x.device)
    if _resolve(impl, x=x, residual=residual, weight=weight) == "torch":
        return reference.add_rms_norm_ref(x, residual, weight, eps)
    return add_rms_norm_triton(x, residual, weight, eps)


def _check_rotary_tables(cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor) -> None:
    """cos/sin must be (T, D // 2) or (B, T, D // 2), on q's device."""
    b, t, _, d = q.shape
    if tuple(cos.shape) not in ((t, d // 2), (b, t, d // 2)):
        raise ValueError(f"cos.shape is {tuple(cos.shape)} but must be (T, D // 2) = {(t, d // 2)} "
                         f"or (B, T, D // 2) = {(b, t, d // 2)}")
    _same("sin.shape", tuple(sin.shape), "cos.shape", tuple(cos.shape))
    _same("cos.device", cos.device, "q.device", q.device)
    _same("sin.device", sin.device, "q.device", q.device)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q (B, T, Hq, D) and k (B, T, Hk, D) in one launch; cos/sin fp32 of shape
    (T, D // 2) or per token (B, T, D // 2)."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4 or t.shape[-1] % 2:
            raise ValueError(f"{name} must be (B, T, H, D) with even D, got shape {tuple(t.shape)}")
    _same("k.shape (B, T, D)", (k.shape[0], k.shape[1], k.shape[3]), "q's", (q.shape[0], q.shape[1], q.shape[3]))
    _same("k.dtype", k.dtype, "q.dtype", q.dtype)
    _same("k.device", k.device, "q.device", q.device)
    _check_rotary_tables(cos, sin, q)
    if _resolve(impl, q=q, k=k, cos=cos, sin=sin) == "torch":
        return reference.rotary_qk_ref(q, k, cos, sin)
    return apply_rotary_qk_triton(q, k, cos, sin)


def _check_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                         softcap: float | None) -> None:
    """Shapes, dtypes and options of linear_cross_entropy."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (vocab, d) (the nn.Linear layout), got shape {tuple(weight.shape)}")
    if x.dim() not in (2, 3) or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be (N, d) or (B, T, d) with d = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(x.shape)}")
    _same("targets.shape", tuple(targets.shape), "x.shape[:-1]", tuple(x.shape[:-1]))
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets.dtype is {targets.dtype} but must be torch.int64 or torch.int32")
    _same("weight.dtype", weight.dtype, "x.dtype", x.dtype)
    _same("weight.device", weight.device, "x.device", x.device)
    _same("targets.device", targets.device, "x.device", x.device)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", softcap: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T against targets, never materializing them (chunked over tokens);
    x (N, d) or (B, T, d), weight (vocab, d), targets shaped like x[..., 0]; targets == ignore_index count for
    nothing. reduction "none" returns the per-token losses, shaped like targets."""
    if torch.is_autocast_enabled(x.device.type):  # the op sits below autocast: cast as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    _check_cross_entropy(x, weight, targets, reduction, softcap)
    flat = targets.reshape(-1).long()
    if not torch.compiler.is_compiling():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"targets hold {int(flat[bad][0])}, outside [0, vocab = {weight.shape[0]}) and not "
                             f"ignore_index ({ignore_index})")
    use_triton = _resolve(impl, x=x, weight=weight) == "triton"
    if not HAVE_TRITON:
        return reference.linear_cross_entropy_ref(x, weight, targets, ignore_index, reduction, softcap)
    loss = linear_cross_entropy_chunked(x.reshape(-1, x.shape[-1]), weight, flat, ignore_index, reduction,
                                        softcap or 0.0, use_triton)
    return loss.view(targets.shape) if reduction == "none" else loss


__all__ = ["flash_attn_func", "flash_attn_varlen_func", "rms_norm", "swiglu", "apply_rotary", "add_rms_norm",
           "apply_rotary_qk", "linear_cross_entropy"]

"""The one correctness rule for every kernel test and benchmark: a kernel may be at most `factor` times as wrong as
PyTorch in the same dtype, plus a small absolute slack.

    max|out - ref| <= factor * max|torch_same_dtype - ref| + atol
    ref: the PyTorch reference on fp64 upcast inputs; factor 2 (3 for attention's dQ);
    atol 1e-5 (fp32), 1e-3 (fp16), 1e-2 (bf16).

`check_op` runs a kernel and its reference on fresh inputs, compares the output and the gradient of every input
that requires one, and runs the kernel with its outputs poisoned (NaN-filled buffers) so that an element the
kernel forgets to write shows up as NaN.
"""

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_rule(name: str, out: torch.Tensor, ref: torch.Tensor, same: torch.Tensor, factor: float = 2.0) -> None:
    """Assert max|out - ref| <= factor * max|same - ref| + atol(out.dtype), and that out has no NaN."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: {int(torch.isnan(out).sum())} NaN elements (unwritten or bad math)"
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    base = (same.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    bound = factor * base + ATOL[out.dtype]
    assert err <= bound, (f"{name} ({out.dtype}): max error {err:.3e} > {factor} x torch's {base:.3e} + atol "
                          f"= {bound:.3e}")


@contextmanager
def poisoned_outputs():
    """Kernel outputs are NaN-filled inside this block (kernels._common.empty_output reads GEB_KERNELS_POISON)."""
    old = os.environ.get("GEB_KERNELS_POISON")
    os.environ["GEB_KERNELS_POISON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["GEB_KERNELS_POISON"]
        else:
            os.environ["GEB_KERNELS_POISON"] = old


def _leaf(t: torch.Tensor, dtype: torch.dtype | None, grad: bool) -> torch.Tensor:
    t = t.detach() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_(grad)


def check_op(kernel: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
             inputs: Sequence[torch.Tensor], names: Sequence[str], grad: Sequence[bool],
             factors: dict[str, float] | None = None) -> None:
    """Compare kernel(*inputs) with reference(*inputs) by the rule, forward and every gradient marked in `grad`.

    Floating inputs are upcast to fp64 for the ground truth; `factors` overrides the factor 2 per gradient name
    (e.g. {"dq": 3}). The upstream gradient is fresh random data in the output's dtype.
    """
    factors = factors or {}
    floating = [t.is_floating_point() for t in inputs]
    runs = {}
    for kind in ("kernel", "same", "ref"):
        runs[kind] = [_leaf(t, torch.float64 if kind == "ref" and f else None, g)
                      for t, f, g in zip(inputs, floating, grad, strict=True)]
    with poisoned_outputs():
        out = kernel(*runs["kernel"])
    same = reference(*runs["same"])
    ref = reference(*runs["ref"])
    assert out.dtype == same.dtype, f"output dtype {out.dtype} != reference dtype {same.dtype}"
    assert_rule("out", out, ref, same)
    if not any(grad):
        return
    dy = torch.randn_like(same)
    with poisoned_outputs():
        out.backward(dy)
    same.backward(dy)
    ref.backward(dy.double())
    for i, (name, g) in enumerate(zip(names, grad, strict=True)):
        if g:
            kernel_grad = runs["kernel"][i].grad
            assert kernel_grad is not None, f"d{name}: no gradient from the kernel"
            assert kernel_grad.dtype == runs["same"][i].grad.dtype, f"d{name}: dtype {kernel_grad.dtype}"
            assert_rule(f"d{name}", kernel_grad, runs["ref"][i].grad, runs["same"][i].grad,
                        factors.get(f"d{name}", 2.0))

"""Int8 quantization of every nn.Linear (LM head included) for CPU inference.

Methods, in the order "auto" tries them (measured on our CPU, see BENCHMARKS.md "CPU decode"):
- "dynamic": torch.ao.quantization.quantize_dynamic (FBGEMM, int8 weights per output channel, activations quantized
  per call). Deprecated in torch 2.x but still present and the fastest eager path measured here.
- "woq": our own weight-only int8 (per-output-channel scales, fp32 activations) through
  torch._weight_int8pack_mm, with a plain-PyTorch fallback; it is also what torch.compile can trace.
The embedding stays fp32: a lookup reads one row per token, quantizing it saves memory, not time.
"""

import warnings

import torch
import torch.nn as nn

METHODS = ("auto", "dynamic", "woq")


class Int8Linear(nn.Module):
    """y = x @ (W_int8 * scale).T with one fp32 scale per output channel (symmetric, weight-only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if hasattr(torch, "_weight_int8pack_mm") and x2.dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(x2.dtype))
        else:  # reference: dequantize on the fly
            y = (x2 @ self.weight.to(x2.dtype).t()) * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _replace_linears(module: nn.Module, make) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
            n += 1
        else:
            n += _replace_linears(child, make)
    return n


def quantize_woq(model: nn.Module) -> int:
    """Replace every nn.Linear by Int8Linear in place; the number replaced."""
    return _replace_linears(model, Int8Linear)


def quantize_dynamic(model: nn.Module) -> int:
    """torch.ao dynamic int8 on every nn.Linear, in place (no second copy of the model); the number replaced."""
    n = sum(isinstance(m, nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization and qint8 tensors warn about deprecation
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return n


def quantize_int8(model: nn.Module, method: str = "auto") -> str:
    """Quantize every linear layer of model in place; the method used ("dynamic" or "woq")."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    if method in ("auto", "dynamic"):
        try:
            quantize_dynamic(model)
            return "dynamic"
        except (AttributeError, ImportError, RuntimeError) as e:
            # torch.ao.quantization is deprecated and may be gone, or FBGEMM missing from this build.
            if method == "dynamic":
                raise
            warnings.warn(f"quantize_dynamic unavailable ({type(e).__name__}: {e}); using weight-only int8",
                          stacklevel=2)
    quantize_woq(model)
    return "woq"

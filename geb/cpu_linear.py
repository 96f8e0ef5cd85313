"""CPU weight formats for inference: every nn.Linear (LM head included) as fp32 for batch-1 decoding, int8 or int4.

At batch 1 a linear layer is a matrix-vector product bound by reading its weights. fp32 (`pack_fp32`), the first
that this machine has:
- "gemv": geb's own kernels (geb/gemv.cpp, built on first use and cached by torch.utils.cpp_extension) on the
  weights as they are: AVX-512 where the CPU has AVX-512 VNNI, else AVX2 (as for int4 below). They stream them faster
  than oneDNN and MKL on our 2-core CPUs (BENCHMARKS.md); prompts of up to 48 tokens go through their register-tiled
  kernel, longer ones through oneDNN's GEMM on the same weights.
- "onednn": the weights reordered once into oneDNN's blocked layout, whose kernel beats MKL's sgemm on the plain
  layout (27 vs 20 GB/s per 2048x5632 matrix here).
- "plain": nn.Linear untouched (MKL).
The values are the same up to summation order.

Int8 methods (measured on our CPU; see BENCHMARKS.md "CPU decode"):
- "fbgemm" (default): dynamic int8 on PyTorch's quantized CPU kernels (FBGEMM, the kernels behind
  torch.ao.quantization.quantize_dynamic): int8 weights with one scale per output channel, activations quantized
  per call. Called through a torch.library operator, so torch.compile traces the model in one graph
  (quantize_dynamic's own modules hold a TorchScript object that dynamo cannot trace: fullgraph compilation fails).
- "woq": weight-only int8 (fp32 activations) through torch._weight_int8pack_mm; the fallback when a torch build
  has no quantized CPU engine. Slow on our CPU, but available everywhere.
torchao (0.18) was measured too and was slower than all but "woq" here; it is not a dependency.

Int4 ("q4_0"): ggml's Q4_0 values (blocks of 32 weights, one fp16 scale each) in geb/gemv.cpp's layout, on its
integer kernels (activations quantized to int8 per block at each call): AVX-512 VNNI where the CPU has it, else AVX2
(`use_q4_kernel`, or GEB_CPU_ISA=avx2, picks AVX2 on an AVX-512 machine). PyTorch has no fast 4-bit CPU kernel for fp32
activations on AVX2 (its int4 CPU kernels vectorize bf16 activations, or need Arm or AVX-512).
The embedding stays fp32: a lookup reads one row per token, quantizing it saves memory, not time.
"""

import functools
import hashlib
import mmap
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils import cpp_extension

from geb.model import GEB

METHODS = ("auto", "geb", "fbgemm", "woq")
QUANTS = ("none", "int8", "q8_0", "int4")

_ARENAS: list = []  # the huge-page mappings holding quantized weights (`move_to_huge_pages`), kept for the process
HUGE_PAGE = 2 << 20

# Packed oneDNN and FBGEMM weights, by handle: operators take tensors and scalars, not TorchScript objects or
# oneDNN-layout tensors (which dynamo cannot trace). Entries live as long as the process (one model per inference
# process; copies of a module share its handle).
_PACKED: list = []
_LOCK = threading.Lock()

# Plain operator registrations, not torch.library.custom_op: its Python wrapper costs ~40 us a call, which is
# 7 ms a token over geb-1.3b's 169 linear layers (10% of an int8 decode step here).
_LIB = torch.library.Library("geb", "FRAGMENT")
_LIB.define("linear_int8_dynamic(Tensor x, int handle, int out_features) -> Tensor")
_LIB.define("linear_onednn(Tensor x, int handle, int out_features) -> Tensor")
_LIB.define("linear_f32(Tensor x, Tensor weight, Tensor? bias) -> Tensor")  # CPU kernel: geb/gemv.cpp
_LIB.define("linear_q4(Tensor x, Tensor qs, Tensor scales, int in_features, int out_features) -> Tensor")  # gemv.cpp
_LIB.define("linear_q8(Tensor x, Tensor qs, Tensor scales, int in_features) -> Tensor")  # CPU kernel: geb/gemv.cpp
_LIB.define("linear_i8(Tensor x, Tensor qs, Tensor scales, Tensor sums, int in_features, int out_features) -> Tensor")


def _linear_int8_dynamic(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    # reduce_range=True: 7-bit activations, so AVX2 without VNNI (vpmaddubsw pairs) cannot saturate int16.
    return torch.ops.quantized.linear_dynamic(x.contiguous(), _PACKED[handle], True)


def _linear_onednn(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    weight, bias = _PACKED[handle]
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _linear_fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


for _name, _kernel in (("linear_int8_dynamic", _linear_int8_dynamic), ("linear_onednn", _linear_onednn)):
    _LIB.impl(_name, _kernel, "CPU")
    torch.library.register_fake(f"geb::{_name}", _linear_fake, lib=_LIB)


@torch.library.register_fake("geb::linear_f32", lib=_LIB)
def _linear_f32_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("geb::linear_q4", lib=_LIB)
def _linear_q4_fake(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, in_features: int,
                    out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("geb::linear_q8", lib=_LIB)
def _linear_q8_fake(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qs.shape[0])


@torch.library.register_fake("geb::linear_i8", lib=_LIB)
def _linear_i8_fake(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, sums: torch.Tensor, in_features: int,
                    out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _build_directory(name: str) -> Path | None:
    """The directory torch.utils.cpp_extension.load builds extension `name` in; None if torch hides it."""
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))  # private, but stable for years
    except (AttributeError, OSError, TypeError):
        return None


def _clear_stale_build_lock(build_dir: Path, max_age_s: float = 600.0) -> None:
    """Remove a torch extension build lock older than any real build: a killed build leaves one, and torch waits on
    it forever."""
    lock = build_dir / "lock"
    try:
        age_s = time.time() - lock.stat().st_mtime
    except OSError:  # no lock: the usual case
        return
    if age_s > max_age_s:
        warnings.warn(f"removing {lock}: a build lock {age_s / 60:.0f} minutes old, left by a build that did not "
                      "finish", stacklevel=3)
        lock.unlink(missing_ok=True)


@functools.cache
def load_gemv() -> bool:
    """Build (first call; torch caches the build by source) and load geb's CPU kernels (geb/gemv.cpp: fp32, Q4_0, Q8_0
    and int8; AVX2 and AVX-512); False, with a warning if the build failed, where it cannot run."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    source = Path(__file__).with_name("gemv.cpp")
    build_dir = _build_directory("geb_gemv")
    if build_dir is not None:
        _clear_stale_build_lock(build_dir)
        if not any(build_dir.glob("*.so")):
            print(f"[geb.cpu_linear] building {source.name} into {build_dir} (first use only, ~30 s)", file=sys.stderr,
                  flush=True)
    # torch hashes the listed sources only: the included headers' hash goes into the flags so a change rebuilds.
    headers = ("gemv_f32.h", "gemv_q4.h", "gemv_q8.h", "gemv_i8.h")
    header = hashlib.sha256(b"".join(source.with_name(h).read_bytes() for h in headers))
    header = header.hexdigest()[:16]
    try:
        # -mavx2 -mfma, not -march=native: a build cached in a shared home directory must run on any AVX2 machine
        # (the AVX-512 kernels are compiled by a target pragma and run only where the CPU has AVX-512 VNNI).
        cpp_extension.load("geb_gemv", [str(source)], extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp",
                                                                    f"-DGEB_Q4_H={header}"],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler or ninja, or a failed build
        warnings.warn(f"could not build {source} ({type(e).__name__}: {e}); fp32 decoding falls back to oneDNN or "
                      "MKL. It needs a C++ compiler and ninja (pip install ninja).", stacklevel=2)
        return False
    return True


def q4_kernels() -> list[str]:
    """The Q4_0 kernels this CPU runs: "avx2", and "vnni" (AVX-512 VNNI) where it has it; [] without geb/gemv.cpp."""
    if not load_gemv():
        return []
    current = torch.ops.geb.q4_kernel()
    try:
        torch.ops.geb.q4_kernel("vnni")
        return ["avx2", "vnni"]
    except RuntimeError:  # no AVX-512 VNNI here
        return ["avx2"]
    finally:
        torch.ops.geb.q4_kernel(current)


def use_q4_kernel(isa: str = "") -> str:
    """Make geb/gemv.cpp's Q4_0 operator use the kernels of isa ("avx2" or "vnni"; "" keeps them); those in use.
    By default it uses AVX-512 VNNI where the CPU has it, unless GEB_CPU_ISA=avx2 is set when it loads."""
    if not load_gemv():
        raise RuntimeError("geb/gemv.cpp is not built here: an AVX2 CPU, a C++ compiler and ninja are needed")
    return torch.ops.geb.q4_kernel(isa)


def _keep(packed) -> int:
    """Store a packed weight for the operators; its handle."""
    with _LOCK:  # layers are packed from several threads
        _PACKED.append(packed)
        return len(_PACKED) - 1


@functools.cache
def _onednn_plain_linear() -> bool:
    """Whether oneDNN's linear runs here on a weight in the plain layout."""
    try:
        x, w = torch.ones(2, 8), torch.ones(4, 8)
        return torch.backends.mkldnn.is_available() and torch.equal(
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.t())
    except (AttributeError, RuntimeError, NotImplementedError):  # a build without this (private) op
        return False


class F32Linear(nn.Module):
    """fp32 linear on geb's kernels (geb/gemv.cpp; AVX-512 or AVX2) up to MAX_ROWS input rows, on oneDNN's GEMM
    beyond (where available); the weight as it is."""

    MAX_ROWS = 48  # a geb-1.3b prefill of 48 tokens was as fast as with oneDNN, 64 slower (BENCHMARKS.md)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not load_gemv():
            raise RuntimeError("F32Linear needs geb/gemv.cpp built: an AVX2 CPU, a C++ compiler and ninja")
        self.register_buffer("weight", linear.weight.detach().float().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.onednn_long_prompts = _onednn_plain_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_long_prompts and x.numel() > self.MAX_ROWS * self.in_features:
            # A long prompt: oneDNN's GEMM reads the plain layout as fast as its own here, 1.5x MKL's (BENCHMARKS.md).
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        return torch.ops.geb.linear_f32(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 (geb kernels)"


class PackedLinear(nn.Module):
    """fp32 linear on a weight reordered into oneDNN's blocked layout (chosen for batch-1 matrix-vector products)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float().contiguous(), 1)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.handle = _keep((weight, bias))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.geb.linear_onednn(x, self.handle, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 packed (oneDNN)"


class DynamicInt8Linear(nn.Module):
    """FBGEMM dynamic int8 linear: per-output-channel symmetric int8 weights, activations quantized per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.handle = _keep(torch.ops.quantized.linear_prepack(qw, bias))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.geb.linear_int8_dynamic(x, self.handle, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel (FBGEMM)"


class Int8Linear(nn.Module):
    """Weight-only int8: y = x @ (W_int8 * scale).T, one fp32 scale per output channel, fp32 activations."""

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
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        else:  # reference: dequantize on the fly
            y = (x2 @ self.weight.float().t()) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


Q4_BLOCK = 32  # weights per Q4_0 block (one fp16 scale each)
Q4_PAD = 256  # geb/gemv.cpp's rows are padded to a multiple of 256 weights
Q4_GROUP = 16  # Q4_0 rows interleaved in one stream by geb/gemv.cpp (kQ4Group); out_features padded to a multiple
Q4_MAX_TILED_ROWS = 1024  # geb/gemv.cpp's kQ4MaxTiledInputs: longer inputs go through fp32 GEMM on dequantized rows


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of w (N, K) as ggml's Q4_0 in geb/gemv.cpp's layout: (qs uint8 (Np, Kp / 2), scales fp16 (Np, Kp / 32)),
    Np = N rounded up to Q4_GROUP and Kp = K to Q4_PAD, with zeros. The values are those of
    gguf.quants.quantize(w, Q4_0); each group of Q4_GROUP rows is interleaved (geb/gemv.cpp says how)."""
    n, k = w.shape
    kp, n_pad = -(-k // Q4_PAD) * Q4_PAD, -(-n // Q4_GROUP) * Q4_GROUP
    blocks = torch.nn.functional.pad(w.detach().float(), (0, kp - k, 0, n_pad - n))
    blocks = blocks.reshape(n_pad, kp // Q4_BLOCK, Q4_BLOCK)
    # ggml's quantize_row_q4_0_ref: d = the block's value of largest magnitude / -8, q = trunc(x / d + 8.5) in 0..15.
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    d = blocks.gather(-1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp_(0, 15).to(torch.uint8)
    ggml = q[..., :16] | (q[..., 16:] << 4)  # (Np, blocks, 16): ggml's bytes, byte j = weights j and j + 16
    # (groups, 16 rows, blocks, 4 t, 4 bytes) -> (groups, blocks, t, rows, bytes): 64 bytes = one byte quad a row.
    qs = ggml.reshape(n_pad // Q4_GROUP, Q4_GROUP, kp // Q4_BLOCK, 4, 4).permute(0, 2, 3, 1, 4).reshape(n_pad, kp // 2)
    scales = d.squeeze(-1).to(torch.float16).reshape(n_pad // Q4_GROUP, Q4_GROUP, -1).transpose(1, 2)
    return qs.contiguous(), scales.reshape(n_pad, kp // Q4_BLOCK).contiguous()


def dequantize_q4_0(qs: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The fp32 weight (out_features, in_features) that quantize_q4_0's output stands for: (q - 8) * d."""
    n_pad, nb = scales.shape
    ggml = qs.reshape(n_pad // Q4_GROUP, nb, 4, Q4_GROUP, 4).permute(0, 3, 1, 2, 4).reshape(n_pad, nb, 16)
    q = torch.cat([ggml & 0x0F, ggml >> 4], dim=-1).float() - 8
    d = scales.reshape(n_pad // Q4_GROUP, nb, Q4_GROUP).transpose(1, 2).reshape(n_pad, nb, 1).float()
    return (q * d).reshape(n_pad, -1)[:out_features, :in_features]


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of w (N, K) as ggml's Q8_0 in geb/gemv.cpp's layout: (qs int8 (N, Kp), scales fp16 (N, Kp / 32)), Kp =
    K rounded up to Q4_PAD with zeros. The values are those of gguf.quants.quantize(w, Q8_0)."""
    n, k = w.shape
    kp = -(-k // Q4_PAD) * Q4_PAD
    blocks = torch.nn.functional.pad(w.detach().float(), (0, kp - k)).reshape(n, kp // Q4_BLOCK, Q4_BLOCK)
    # ggml's quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d) (half away from zero), computed as x * (1/d).
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = blocks * inv
    q = (v.sign() * (v.abs() + 0.5).floor()).to(torch.int8)
    return q.reshape(n, kp).contiguous(), d.squeeze(-1).to(torch.float16).contiguous()


def dequantize_q8_0(qs: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The fp32 weight (out_features, in_features) that quantize_q8_0's output stands for: q * d."""
    n = qs.shape[0]
    return (qs.reshape(n, -1, Q4_BLOCK).float() * scales.float()[..., None]).reshape(n, -1)[:out_features, :in_features]


I8_GROUP = 16  # per-channel int8 rows interleaved in one stream by geb/gemv.cpp (kI8Group)
I8_PAD = 64  # geb/gemv.cpp's per-channel int8 rows are padded to a multiple of 64 weights (kI8Pad)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of w (N, K) as int8 with one scale a row (d = max|w| / 127, q = round(w / d)) in geb/gemv.cpp's
    layout: (qs int8 (Np, Kp), scales fp32 (Np,), sums int32 (Np,) = 128 * sum(q) a row), Np = N rounded up to
    I8_GROUP and Kp = K to I8_PAD, with zeros; each group of I8_GROUP rows interleaved four columns at a time."""
    n, k = w.shape
    kp, n_pad = -(-k // I8_PAD) * I8_PAD, -(-n // I8_GROUP) * I8_GROUP
    wp = torch.nn.functional.pad(w.detach().float(), (0, kp - k, 0, n_pad - n))
    d = wp.abs().amax(dim=1) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(wp * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    sums = 128 * q.sum(dim=1, dtype=torch.int32)
    qs = q.reshape(n_pad // I8_GROUP, I8_GROUP, kp // 4, 4).permute(0, 2, 1, 3).reshape(n_pad, kp)
    return qs.contiguous(), d.contiguous(), sums.contiguous()


def dequantize_int8_rows(qs: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The fp32 weight (out_features, in_features) that quantize_int8_rows's output stands for: q * d."""
    n_pad, kp = qs.shape
    q = qs.reshape(n_pad // I8_GROUP, kp // 4, I8_GROUP, 4).permute(0, 2, 1, 3).reshape(n_pad, kp)
    return (q.float() * scales[:, None])[:out_features, :in_features]


class IntegerLinear(nn.Module):
    """A linear layer on one of geb/gemv.cpp's integer kernels (inference only). Subclasses name the format, its
    buffers (BUFFERS, in the kernel's argument order), quantizer, empty buffers of a shape, and kernel."""

    FORMAT: str
    BUFFERS: tuple[str, ...]

    @staticmethod
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The buffers of the rows of w in this format."""
        raise NotImplementedError

    @classmethod
    def empty_buffers(cls, in_features: int, out_features: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Uninitialized buffers for a weight of this shape."""
        raise NotImplementedError

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T on geb/gemv.cpp's kernel for this format."""
        raise NotImplementedError

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._require_gemv()
        self._set(linear, self.quantize(linear.weight), None if linear.bias is None else linear.bias.detach().float())

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> "IntegerLinear":
        """A layer of linear's shape with uninitialized weights (on linear's device), to load a state dict."""
        cls._require_gemv()
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        buffers = cls.empty_buffers(linear.in_features, linear.out_features, linear.weight.device)
        self._set(linear, buffers, None if linear.bias is None else torch.empty_like(linear.bias))
        return self

    @classmethod
    def _require_gemv(cls) -> None:
        if not load_gemv():
            raise RuntimeError(f"{cls.__name__} needs geb/gemv.cpp built: an AVX2 CPU, a C++ compiler and ninja")

    def _set(self, linear: nn.Linear, buffers: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> None:
        for name, b in zip(self.BUFFERS, buffers, strict=True):
            self.register_buffer(name, b)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.FORMAT} (geb "
                f"{use_q4_kernel()} kernels)")


class ChannelInt8Linear(IntegerLinear):
    """8-bit linear: int8 weights with one scale a row (`quantize_int8_rows`), activations quantized to int8 per input
    row at each call, whole rows summed in int32."""

    FORMAT, BUFFERS = "int8 per channel", ("qs", "scales", "sums")
    quantize = staticmethod(quantize_int8_rows)

    @classmethod
    def empty_buffers(cls, in_features: int, out_features: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        kp, rows = -(-in_features // I8_PAD) * I8_PAD, -(-out_features // I8_GROUP) * I8_GROUP
        return (torch.empty(rows, kp, dtype=torch.int8, device=device), torch.empty(rows, device=device),
                torch.empty(rows, dtype=torch.int32, device=device))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.geb.linear_i8(x, self.qs, self.scales, self.sums, self.in_features, self.out_features)


class BlockLinear(IntegerLinear):
    """A linear layer in one of ggml's block formats (blocks of 32 weights, one fp16 scale each; geb/gemv.cpp's
    layout), activations quantized to int8 per block at each call. Int4Linear and Q8Linear say which format: its
    qs bytes per weight and dtype, row multiple, quantizer and kernel."""

    BUFFERS = ("qs", "scales")
    QS_BYTES_PER_WEIGHT: float
    QS_DTYPE: torch.dtype
    ROW_MULTIPLE: int  # qs and scales hold out_features rounded up to this

    @classmethod
    def empty_buffers(cls, in_features: int, out_features: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        kp = -(-in_features // Q4_PAD) * Q4_PAD
        rows = -(-out_features // cls.ROW_MULTIPLE) * cls.ROW_MULTIPLE
        return (torch.empty(rows, int(kp * cls.QS_BYTES_PER_WEIGHT), dtype=cls.QS_DTYPE, device=device),
                torch.empty(rows, kp // Q4_BLOCK, dtype=torch.float16, device=device))


class Int4Linear(BlockLinear):
    """4-bit linear: Q4_0 weights (two per qs byte), rows interleaved in groups of Q4_GROUP."""

    FORMAT, QS_BYTES_PER_WEIGHT, QS_DTYPE, ROW_MULTIPLE = "Q4_0", 0.5, torch.uint8, Q4_GROUP
    quantize = staticmethod(quantize_q4_0)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.geb.linear_q4(x, self.qs, self.scales, self.in_features, self.out_features)


class Q8Linear(BlockLinear):
    """8-bit linear: Q8_0 weights."""

    FORMAT, QS_BYTES_PER_WEIGHT, QS_DTYPE, ROW_MULTIPLE = "Q8_0", 1.0, torch.int8, 1
    quantize = staticmethod(quantize_q8_0)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.geb.linear_q8(x, self.qs, self.scales, self.in_features)


def quantize_q8(model: nn.Module) -> str:
    """Quantize every linear layer of model to Q8_0 (geb's integer kernels) in place; "q8_0"."""
    if not load_gemv():
        raise RuntimeError("--quant q8_0 needs geb/gemv.cpp built: an AVX2 CPU, a C++ compiler and ninja "
                           "(pip install ninja)")
    _replace_linears(model, Q8Linear)
    return "q8_0"


def quantize_int4(model: nn.Module) -> str:
    """Quantize every linear layer of model to Q4_0 in place; "q4_0"."""
    if not load_gemv():
        raise RuntimeError("--quant int4 needs geb/gemv.cpp built: an AVX2 CPU, a C++ compiler and ninja "
                           "(pip install ninja)")
    _replace_linears(model, Int4Linear)
    return "q4_0"


def _replace_linears(module: nn.Module, make) -> int:
    """Replace every nn.Linear under module by make(linear); the number replaced."""
    sites = [(parent, name) for parent in module.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]

    def convert(site):
        parent, name = site
        # Replacing one layer at a time frees each fp32 weight as its int8 copy appears (no second model copy).
        setattr(parent, name, make(getattr(parent, name)))

    # Weight packing is single-threaded inside PyTorch (~1 s per 2048x5632 matrix here) and releases the GIL:
    # spread the layers over the intra-op threads.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        warnings.simplefilter("ignore")  # qint8 tensors are deprecated as a user-facing type
        list(pool.map(convert, sites))
    return len(sites)


def pack_fp32(model: nn.Module) -> str:
    """Convert every nn.Linear for fp32 batch-1 decoding, in place; the format used: "gemv" (geb's kernel), "onednn"
    or "plain" (model untouched)."""
    if load_gemv():
        _replace_linears(model, F32Linear)
        return "gemv"
    if not torch.backends.mkldnn.is_available():
        return "plain"
    try:
        PackedLinear(nn.Linear(8, 8))
    except (AttributeError, RuntimeError, NotImplementedError):  # a build without these (private) ops
        return "plain"
    _replace_linears(model, PackedLinear)
    return "onednn"


def convert_for_cpu(model: GEB, quant: str = "none") -> str:
    """Fuse the model's q/k/v and gate/up projections, then convert every linear layer for CPU decoding: "none"
    keeps fp32 (`pack_fp32`), "int8", "q8_0" and "int4" quantize; the weight format used."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    model.fuse_projections()
    if quant == "none":
        return pack_fp32(model)
    return {"int8": quantize_int8, "q8_0": quantize_q8, "int4": quantize_int4}[quant](model)


def move_to_huge_pages(model: nn.Module) -> int:
    """Copy the large weights of model's layers on geb's integer kernels into anonymous mappings advised for
    transparent huge pages (Linux), in place; the bytes moved (0 where the OS has no such advice). Each token streams
    them all, with fewer TLB misses on 2 MiB pages (int8 decodes faster, BENCHMARKS.md), but the copy costs start-up
    time (infer_cpu.py --huge-pages)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    moved = 0
    for module in model.modules():
        if not isinstance(module, IntegerLinear):
            continue
        for name, b in list(module.named_buffers(recurse=False)):
            if b is None or b.device.type != "cpu" or b.nbytes < HUGE_PAGE:
                continue
            # One mapping a tensor (torch.save refuses one storage viewed as several dtypes), from a 2 MiB boundary.
            region = mmap.mmap(-1, b.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                region.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: ordinary pages
                pass
            offset = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
            view = torch.frombuffer(region, dtype=b.dtype, count=b.numel(), offset=offset).view(b.shape)
            view.copy_(b)
            module._buffers[name] = view
            _ARENAS.append(region)
            moved += b.nbytes
    return moved


def int8_method() -> str:
    """What --quant int8 runs here: "geb" (geb's per-channel kernel) where geb/gemv.cpp runs its AVX-512 VNNI
    kernels, else "fbgemm". On AVX2 alone FBGEMM decodes as fast and prefills ~3x faster (BENCHMARKS.md)."""
    return "geb" if load_gemv() and use_q4_kernel() == "vnni" else "fbgemm"


def quantize_int8(model: nn.Module, method: str = "auto") -> str:
    """Quantize every linear layer of model in place; the method used ("geb", "fbgemm" or "woq"). "auto" is
    `int8_method()`, falling back to weight-only int8 where FBGEMM is missing."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    if method == "geb" or (method == "auto" and int8_method() == "geb"):
        _replace_linears(model, ChannelInt8Linear)
        return "geb"
    if method in ("auto", "fbgemm"):
        try:
            _replace_linears(model, DynamicInt8Linear)
            return "fbgemm"
        except (AttributeError, RuntimeError) as e:
            # A torch build without the quantized CPU engine (or a future one without these ops).
            if method == "fbgemm":
                raise
            warnings.warn(f"FBGEMM int8 unavailable ({type(e).__name__}: {e}); using weight-only int8", stacklevel=2)
    _replace_linears(model, Int8Linear)
    return "woq"

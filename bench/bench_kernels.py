"""pytest-benchmark: every kernel vs its references, forward and forward+backward.

Providers: "triton" (our kernels), "torch" (eager PyTorch reference), "compile" (torch.compile of the reference),
for attention also "sdpa_flash" and "sdpa_cudnn" (PyTorch SDPA backends), and "liger" (Liger-Kernel, when
importable) for RMSNorm, SwiGLU and rotary. Each result is checked against the reference by the kernel tests'
rule before it is timed (ours must pass; a third-party kernel's miss is recorded in extra_info["outside_rule"]).
extra_info records TFLOP/s (attention) or effective GB/s (the others: the bytes an op must read and write at
least), on a GPU from device time (triton.testing.do_bench) with the wall-clock figures as "*_wall", and the peak
CUDA memory of one call above the inputs.

On a GPU: GEB-1.3B shapes in bf16 (8k-32k tokens, d 2048, FFN 5632, 16 heads / 4 KV heads, head dim 128 and
64, T 1k-16k), plus the device's copy bandwidth and bf16 matmul rate as ceilings. On a CPU: the reference paths
are timed at small sizes, and the Triton kernels are only checked under the interpreter at tiny sizes (one
untimed-quality round: interpreter timings mean nothing).

    pytest bench/ --benchmark-json=bench.json && python bench/report.py bench.json
"""

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from kernel_check import assert_rule
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# torch.compile on a CPU spends ~10-60 s compiling C++ per graph: opt in with GEB_BENCH_COMPILE=1.
COMPILE_ON_CPU = os.environ.get("GEB_BENCH_COMPILE") == "1"

try:  # Liger-Kernel is an optional comparison point: its rows are skipped without it
    import liger_kernel  # noqa: F401

    HAVE_LIGER = True
except ImportError:
    HAVE_LIGER = False

# GEB_BENCH_QUICK=1 (bench/gpu.sh fused): one shape per op, forward+backward only, so the device run stays short.
QUICK = os.environ.get("GEB_BENCH_QUICK") == "1"
MODES = ["fwd_bwd"] if QUICK else ["fwd", "fwd_bwd"]
# On a CPU, few rounds: the point there is that every path runs and is checked, not precise timings.
pytestmark = pytest.mark.benchmark(min_rounds=5 if CUDA else 2, max_time=0.5 if CUDA else 0.2)


# ---------------------------------------------------------------------------------------------------------------
# Shapes. GPU: GEB-1.3B. CPU: references at small but meaningful sizes; Triton (interpreter) at tiny sizes.
# ---------------------------------------------------------------------------------------------------------------
if CUDA:
    ATTN_SHAPES = [  # (B, T, Hq, Hkv, D, causal): 16k tokens per batch except at T = 16k
        (16, 1024, 16, 4, 128, True), (8, 2048, 16, 4, 128, True), (4, 4096, 16, 4, 128, True),
        (2, 8192, 16, 4, 128, True), (1, 16384, 16, 4, 128, True), (8, 2048, 16, 4, 128, False),
        (8, 2048, 32, 8, 64, True), (8, 2048, 32, 8, 64, False), (2, 8192, 32, 8, 64, True),
    ]
    NORM_SHAPES = [(8192, 2048), (16384, 2048), (32768, 2048)]  # (tokens, d_model)
    SWIGLU_SHAPES = [(8192, 5632), (16384, 5632), (32768, 5632)]  # (tokens, ffn)
    ROTARY_SHAPES = [(4, 2048, 16, 4, 128), (8, 2048, 16, 4, 128), (4, 8192, 16, 4, 128)]  # (B, T, Hq, Hkv, D)
    CE_SHAPES = [(16384, 2048, 64896)]  # (tokens, d_model, vocab): geb-1.3b at batch 8 x 2048
    if QUICK:
        ATTN_SHAPES, NORM_SHAPES, SWIGLU_SHAPES = ATTN_SHAPES[1:2], [(32768, 2048)], SWIGLU_SHAPES[1:2]
        ROTARY_SHAPES = ROTARY_SHAPES[1:2]
    TRITON_ATTN, TRITON_NORM, TRITON_SWIGLU, TRITON_ROTARY = ATTN_SHAPES, NORM_SHAPES, SWIGLU_SHAPES, ROTARY_SHAPES
    TRITON_CE = CE_SHAPES
else:
    ATTN_SHAPES = [(1, 512, 16, 4, 128, True)]
    NORM_SHAPES = [(1024, 2048)]
    SWIGLU_SHAPES = [(1024, 5632)]
    ROTARY_SHAPES = [(1, 512, 16, 4, 128)]
    TRITON_ATTN = [(1, 64, 4, 2, 64, True)]
    TRITON_NORM = [(64, 2048)]
    TRITON_SWIGLU = [(64, 5632)]
    TRITON_ROTARY = [(1, 64, 16, 4, 128)]
    CE_SHAPES = [(512, 256, 8192)]
    TRITON_CE = [(20, 16, 64896)]


def _providers(extra: list[str]) -> list[str]:
    return ["triton", "torch", "compile", *extra]


def _skip_unavailable(provider: str) -> None:
    if provider == "triton" and not (CUDA or INTERPRET):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if provider == "compile" and not CUDA and not COMPILE_ON_CPU:
        pytest.skip("torch.compile on CPU is slow to compile: set GEB_BENCH_COMPILE=1")
    if provider.startswith("sdpa_") and not CUDA:
        pytest.skip("SDPA flash/cuDNN backends need a GPU")
    if provider == "liger" and not (HAVE_LIGER and CUDA):
        pytest.skip("Liger-Kernel is not installed (or no GPU)")


def _shapes(provider: str, gpu_or_reference: list, triton_cpu: list) -> list:
    return triton_cpu if provider == "triton" and not CUDA else gpu_or_reference


# ---------------------------------------------------------------------------------------------------------------
# The shared check-then-time runner.
# ---------------------------------------------------------------------------------------------------------------
def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _leaves(inputs: list[torch.Tensor], grad: list[bool], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    out = []
    for t, g in zip(inputs, grad, strict=True):
        t = t.detach() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
        out.append(t.requires_grad_(g and t.is_floating_point()))
    return out


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _check(fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor], grad: list[bool], mode: str,
           names: list[str], factors: dict[str, float]) -> None:
    """fn's outputs (and input gradients for fwd_bwd) vs the fp64 (CPU) / fp32 (GPU) reference, by the rule."""
    truth_dtype = torch.float32 if CUDA else torch.float64
    backward = mode == "fwd_bwd"
    runs = {}
    for kind, dtype, f in (("fn", None, fn), ("same", None, ref_fn), ("ref", truth_dtype, ref_fn)):
        args = _leaves(inputs, [g and backward for g in grad], dtype)
        outs = _as_tuple(f(*args))
        grads = ()
        if backward:
            dys = [torch.ones_like(o) * 0.5 + 0.0 * o for o in outs]  # deterministic upstream gradient
            grads = torch.autograd.grad(outs, [a for a, g in zip(args, grad, strict=True) if g], dys)
        runs[kind] = ([o.detach() for o in outs], grads)
    for i, out in enumerate(runs["fn"][0]):
        assert_rule(f"out{i}", out, runs["ref"][0][i], runs["same"][0][i], factors.get("dout", 2.0))
    if not backward:
        return
    grad_names = [n for n, g in zip(names, grad, strict=True) if g]
    for name, g, g_ref, g_same in zip(grad_names, runs["fn"][1], runs["ref"][1], runs["same"][1], strict=True):
        assert_rule(f"d{name}", g, g_ref, g_same, factors.get(f"d{name}", 2.0))


def _bench(benchmark, *, op: str, provider: str, mode: str, shape: tuple, fn: Callable, ref_fn: Callable,
           inputs: list[torch.Tensor], grad: list[bool], names: list[str], work: Callable[[float], dict],
           factors: dict[str, float] | None = None) -> None:
    """Check fn against ref_fn, then time it (fwd, or fwd + backward) and record throughput and peak memory."""
    if provider.startswith("sdpa_") or provider == "liger":
        try:  # a third-party backend that cannot run this shape or dtype is skipped, not failed
            fn(*_leaves(inputs, [False] * len(inputs)))
        except (RuntimeError, TypeError, ValueError) as e:
            pytest.skip(f"{provider} cannot run {shape}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    factors = factors or {}
    outside_rule = None
    if provider in ("triton", "torch", "compile", "chunked"):
        _check(fn, ref_fn, inputs, grad, mode, names, factors)
    else:
        # Third-party kernels (SDPA backends, Liger): twice the slack, and a miss is recorded, not failed. Our
        # kernels must meet the rule; theirs are comparison points (Liger's SwiGLU backward misses it in bf16).
        factors = {name: 2 * factors.get(name, 2.0) for name in ["dout", *[f"d{n}" for n in names]]}
        try:
            _check(fn, ref_fn, inputs, grad, mode, names, factors)
        except AssertionError as e:
            outside_rule = str(e).splitlines()[0]
    args = _leaves(inputs, [g and mode == "fwd_bwd" for g in grad])
    wrt = [a for a, g in zip(args, grad, strict=True) if g]

    if mode == "fwd":
        def launch():
            with torch.no_grad():
                fn(*args)
    else:
        dys = None

        def launch():
            nonlocal dys
            outs = _as_tuple(fn(*args))
            dys = dys or [torch.randn_like(o) for o in outs]
            torch.autograd.grad(outs, wrt, dys)

    def run():
        launch()
        _sync()

    peak_mb = None
    if CUDA:
        run()  # warm-up (and autotune) before measuring memory
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20

    benchmark.group = f"{op} {mode} {shape}"
    benchmark.extra_info.update({"op": op, "provider": provider, "mode": mode, "shape": str(shape),
                                 "dtype": str(inputs[0].dtype).removeprefix("torch."), "device": DEVICE,
                                 "peak_mem_mb": peak_mb, "outside_rule": outside_rule})
    if provider == "triton" and not CUDA:
        # Interpreter: the check above is the point; one round keeps the row in the report.
        benchmark.extra_info["note"] = "TRITON_INTERPRET: checked, time not meaningful"
        benchmark.pedantic(run, rounds=1, iterations=1)
        return
    _time(benchmark, launch, work)


def _time(benchmark, launch: Callable, work: Callable[[float], dict]) -> None:
    """Time launch() with a sync per call, then record throughput in extra_info: from device time on a GPU (and
    wall time beside it), from wall time on a CPU."""
    def run():
        launch()
        _sync()
    benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is None or stats.stats.median <= 0:
        return
    if not CUDA:
        benchmark.extra_info.update(work(stats.stats.median))
        return
    # pytest-benchmark's wall time includes the launch and a host sync per call, which weighs on sub-millisecond
    # calls; throughput is reported on device time (CUDA events, L2 flushed between calls, median), as published
    # kernel figures are, and the wall-clock throughput is kept beside it.
    import triton.testing  # Triton is optional (`kernels` runs without it); needed here on a GPU only

    device_ms = triton.testing.do_bench(launch, warmup=25, rep=100, return_mode="median")
    benchmark.extra_info["device_ms"] = device_ms
    benchmark.extra_info.update(work(device_ms / 1e3))
    benchmark.extra_info.update({f"{k}_wall": v for k, v in work(stats.stats.median).items()})


def _compiled(fn: Callable) -> Callable:
    # Every case compiles the same function objects anew: without a reset, dynamo's recompile limit (8 per code
    # object) is reached after a few shapes and later cases silently run eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------------------------
def _sdpa(backend):
    def attn(q, k, v, causal, scale):
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel(backend):
            try:
                out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal, scale=scale, enable_gqa=True)
            except RuntimeError:  # backend without native GQA: repeat K/V (costs memory, counted in peak)
                rep = q.shape[2] // k.shape[2]
                out = F.scaled_dot_product_attention(q_t, k_t.repeat_interleave(rep, 1), v_t.repeat_interleave(rep, 1),
                                                     is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    return attn


def _attention_fn(provider: str, causal: bool, scale: float) -> Callable:
    if provider == "triton":
        return lambda q, k, v: kernels.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale, impl="triton")
    if provider in ("torch", "compile"):
        fn = lambda q, k, v: reference.attention_ref(q, k, v, causal, scale)  # noqa: E731
        return _compiled(fn) if provider == "compile" else fn
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[provider]
    attn = _sdpa(backend)
    return lambda q, k, v: attn(q, k, v, causal, scale)


def _attention_cases():
    for provider in _providers(["sdpa_flash", "sdpa_cudnn"]):
        for shape in _shapes(provider, ATTN_SHAPES, TRITON_ATTN):
            for mode in MODES:
                yield pytest.param(provider, shape, mode, id=f"{provider}-{mode}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("provider, shape, mode", list(_attention_cases()))
def test_attention(benchmark, provider, shape, mode):
    _skip_unavailable(provider)
    b, t, h_q, h_kv, d, causal = shape
    q = torch.randn(b, t, h_q, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(b, t, h_kv, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(b, t, h_kv, d, device=DEVICE, dtype=DTYPE)
    scale = d ** -0.5
    # FlashAttention's convention: 4*B*T^2*H*D matmul FLOPs forward, halved when causal; the backward does 2.5x
    # the forward's, so forward+backward counts 3.5x.
    flops = 4 * b * t * t * h_q * d / (2 if causal else 1) * (3.5 if mode == "fwd_bwd" else 1.0)
    _bench(benchmark, op="attention", provider=provider, mode=mode, shape=shape,
           fn=_attention_fn(provider, causal, scale), ref_fn=_attention_fn("torch", causal, scale),
           inputs=[q, k, v], grad=[True, True, True], names=["q", "k", "v"], factors={"dq": 3.0},
           work=lambda sec: {"tflops": flops / sec / 1e12})


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU, rotary: memory-bound, reported in effective GB/s.
# ---------------------------------------------------------------------------------------------------------------
def _gbps(n_bytes: float) -> Callable[[float], dict]:
    return lambda sec: {"gbps": n_bytes / sec / 1e9}


def _rms_fn(provider: str) -> Callable:
    eps = 1e-5
    if provider == "triton":
        return lambda x, w: kernels.rms_norm(x, w, eps, impl="triton")
    if provider == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # optional comparison point

        return lambda x, w: LigerRMSNormFunction.apply(x, w, eps)
    fn = lambda x, w: reference.rms_norm_ref(x, w, eps)  # noqa: E731
    return _compiled(fn) if provider == "compile" else fn


def _simple_cases(shapes: list, triton_shapes: list):
    for provider in _providers(["liger"]):
        for shape in _shapes(provider, shapes, triton_shapes):
            for mode in MODES:
                yield pytest.param(provider, shape, mode, id=f"{provider}-{mode}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("provider, shape, mode", list(_simple_cases(NORM_SHAPES, TRITON_NORM)))
def test_rms_norm(benchmark, provider, shape, mode):
    _skip_unavailable(provider)
    n, d = shape
    x = torch.randn(n, d, device=DEVICE, dtype=DTYPE)
    w = 1 + 0.1 * torch.randn(d, device=DEVICE, dtype=DTYPE)
    size = x.element_size()
    # fwd: read x, write y; bwd: read dy, x, write dx (w, rstd and dW partials are negligible).
    n_bytes = n * d * size * (2 if mode == "fwd" else 5)
    _bench(benchmark, op="rms_norm", provider=provider, mode=mode, shape=shape, fn=_rms_fn(provider),
           ref_fn=_rms_fn("torch"), inputs=[x, w], grad=[True, True], names=["x", "w"], work=_gbps(n_bytes))


def _swiglu_fn(provider: str) -> Callable:
    if provider == "triton":
        return lambda g, u: kernels.swiglu(g, u, impl="triton")
    if provider == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # optional comparison point

        return lambda g, u: LigerSiLUMulFunction.apply(g, u)
    return _compiled(reference.swiglu_ref) if provider == "compile" else reference.swiglu_ref


@pytest.mark.parametrize("provider, shape, mode", list(_simple_cases(SWIGLU_SHAPES, TRITON_SWIGLU)))
def test_swiglu(benchmark, provider, shape, mode):
    _skip_unavailable(provider)
    gate = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    up = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    # fwd: read gate, up, write y; bwd: read dy, gate, up, write d_gate, d_up.
    n_bytes = gate.numel() * gate.element_size() * (3 if mode == "fwd" else 8)
    _bench(benchmark, op="swiglu", provider=provider, mode=mode, shape=shape, fn=_swiglu_fn(provider),
           ref_fn=_swiglu_fn("torch"), inputs=[gate, up], grad=[True, True], names=["gate", "up"],
           work=_gbps(n_bytes))


def _rotary_fn(provider: str) -> Callable:
    """Rotates q and k, as the model does for every layer."""
    if provider == "triton":
        return lambda q, k, cos, sin: (kernels.apply_rotary(q, cos, sin, impl="triton"),
                                       kernels.apply_rotary(k, cos, sin, impl="triton"))
    if provider == "liger":
        from liger_kernel.ops.rope import LigerRopeFunction  # optional comparison point

        def liger(q, k, cos, sin):
            # Liger takes (B, H, T, D) and full-width (1, T, D) tables, and rotates in place: give it copies.
            cos_full, sin_full = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
            q_out, k_out = LigerRopeFunction.apply(q.transpose(1, 2).clone(), k.transpose(1, 2).clone(),
                                                   cos_full, sin_full)
            return q_out.transpose(1, 2), k_out.transpose(1, 2)
        return liger

    def ref(q, k, cos, sin):
        return reference.rotary_ref(q, cos, sin), reference.rotary_ref(k, cos, sin)
    return _compiled(ref) if provider == "compile" else ref


@pytest.mark.parametrize("provider, shape, mode", list(_simple_cases(ROTARY_SHAPES, TRITON_ROTARY)))
def test_rotary(benchmark, provider, shape, mode):
    _skip_unavailable(provider)
    b, t, h_q, h_kv, d = shape
    q = torch.randn(b, t, h_q, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(b, t, h_kv, d, device=DEVICE, dtype=DTYPE)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2, device=DEVICE, dtype=torch.float32) / d)
    angles = torch.arange(t, device=DEVICE, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    # fwd: read x, write out; bwd: read dout, write dx (cos/sin tables are small and cached).
    n_bytes = (q.numel() + k.numel()) * q.element_size() * 2 * (1 if mode == "fwd" else 2)
    _bench(benchmark, op="rotary", provider=provider, mode=mode, shape=shape, fn=_rotary_fn(provider),
           ref_fn=_rotary_fn("torch"), inputs=[q, k, cos, sin], grad=[True, True, False, False],
           names=["q", "k", "cos", "sin"], work=_gbps(n_bytes))


# ---------------------------------------------------------------------------------------------------------------
# The fused ops: residual add + RMSNorm, q and k rotated in one launch, linear cross-entropy.
# ---------------------------------------------------------------------------------------------------------------
def _add_rms_fn(provider: str) -> Callable:
    eps = 1e-5
    if provider == "triton":
        return lambda x, r, w: kernels.add_rms_norm(x, r, w, eps, impl="triton")
    if provider == "liger":
        try:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction  # optional comparison
        except ImportError:
            pytest.skip("this Liger-Kernel has no fused add + RMSNorm")
        return lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r.clone(), w, eps)
    fn = lambda x, r, w: reference.add_rms_norm_ref(x, r, w, eps)  # noqa: E731
    return _compiled(fn) if provider == "compile" else fn


@pytest.mark.parametrize("provider, shape, mode", list(_simple_cases(NORM_SHAPES, TRITON_NORM)))
def test_fused_add_rms_norm(benchmark, provider, shape, mode):
    _skip_unavailable(provider)
    n, d = shape
    x, r = torch.randn(n, d, device=DEVICE, dtype=DTYPE), torch.randn(n, d, device=DEVICE, dtype=DTYPE)
    w = 1 + 0.1 * torch.randn(d, device=DEVICE, dtype=DTYPE)
    # fwd: read x, r, write y, s; bwd: read dy, ds, s, write d(sum) (x and residual share it).
    n_bytes = n * d * x.element_size() * (4 if mode == "fwd" else 8)
    _bench(benchmark, op="add_rms_norm", provider=provider, mode=mode, shape=shape, fn=_add_rms_fn(provider),
           ref_fn=_add_rms_fn("torch"), inputs=[x, r, w], grad=[True, True, True], names=["x", "residual", "w"],
           work=_gbps(n_bytes))


def _rotary_qk_fn(provider: str) -> Callable:
    if provider == "triton":
        return lambda q, k, cos, sin: kernels.apply_rotary_qk(q, k, cos, sin, impl="triton")
    return _rotary_fn(provider)


@pytest.mark.parametrize("provider, shape, mode", list(_simple_cases(ROTARY_SHAPES, TRITON_ROTARY)))
def test_fused_rotary_qk(benchmark, provider, shape, mode):
    """As test_rotary, our provider being the one-launch apply_rotary_qk."""
    _skip_unavailable(provider)
    b, t, h_q, h_kv, d = shape
    q = torch.randn(b, t, h_q, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(b, t, h_kv, d, device=DEVICE, dtype=DTYPE)
    angles = torch.rand(t, d // 2, device=DEVICE) * 6
    n_bytes = (q.numel() + k.numel()) * q.element_size() * 2 * (1 if mode == "fwd" else 2)
    _bench(benchmark, op="rotary_qk", provider=provider, mode=mode, shape=shape, fn=_rotary_qk_fn(provider),
           ref_fn=_rotary_qk_fn("torch"), inputs=[q, k, angles.cos(), angles.sin()], grad=[True, True, False, False],
           names=["q", "k", "cos", "sin"], work=_gbps(n_bytes))


def _ce_fn(provider: str) -> Callable:
    """Mean cross-entropy of x @ w.T: ours (chunked), or F.linear + F.cross_entropy on the full logits."""
    if provider in ("triton", "chunked"):
        impl = "triton" if provider == "triton" else "torch"
        return lambda x, w, t: kernels.linear_cross_entropy(x, w, t, impl=impl)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional comparison point

        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, t: loss(w, x, t)
    fn = reference.linear_cross_entropy_ref
    return _compiled(fn) if provider == "compile" else fn


@pytest.mark.parametrize("provider, shape, mode", [
    pytest.param(p, s, "fwd_bwd", id=f"{p}-fwd_bwd-{'x'.join(map(str, s))}")
    for p in ["triton", "chunked", "torch", "compile", "liger"]
    for s in _shapes(p, CE_SHAPES, TRITON_CE)])
def test_fused_linear_cross_entropy(benchmark, provider, shape, mode):
    """Loss + backward (x and weight gradients); TFLOP/s of the three matmuls (6 N d V) and peak memory."""
    _skip_unavailable(provider)
    n, d, vocab = shape
    x = torch.randn(n, d, device=DEVICE, dtype=DTYPE)
    w = torch.randn(vocab, d, device=DEVICE, dtype=DTYPE) * d**-0.5
    t = torch.randint(0, vocab, (n,), device=DEVICE)
    _bench(benchmark, op="linear_cross_entropy", provider=provider, mode=mode, shape=shape, fn=_ce_fn(provider),
           ref_fn=_ce_fn("torch"), inputs=[x, w, t], grad=[True, True, False], names=["x", "w", "t"],
           work=lambda sec: {"tflops": 6 * n * d * vocab / sec / 1e12})


# ---------------------------------------------------------------------------------------------------------------
# Ceilings: what the device can do at best, to read the kernels' figures against.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd"])
def test_ceiling_copy(benchmark, mode):
    """Device-to-device copy of 1 GiB (64 MiB on CPU); GB/s counts the bytes read plus the bytes written."""
    n = (2**30 if CUDA else 2**26) // 2
    src = torch.randn(n, device=DEVICE, dtype=torch.float16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    assert torch.equal(dst, src)
    benchmark.group = f"copy {mode}"
    benchmark.extra_info.update({"op": "ceiling_copy", "provider": "torch", "mode": mode, "shape": str((n,)),
                                 "dtype": "float16", "device": DEVICE, "peak_mem_mb": None})
    _time(benchmark, lambda: dst.copy_(src), _gbps(2 * n * src.element_size()))


@pytest.mark.parametrize("mode", ["fwd"])
def test_ceiling_matmul(benchmark, mode):
    """The dense matmul rate: 8192^3 in bf16 on a GPU (1024^3 fp32 on CPU), fresh random operands."""
    n = 8192 if CUDA else 1024
    a, b = torch.randn(n, n, device=DEVICE, dtype=DTYPE), torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    ref = (a[:64].double() @ b.double())
    assert_rule("matmul", (a @ b)[:64], ref, (a.float() @ b.float())[:64].to(DTYPE), factor=4.0)
    benchmark.group = f"matmul {mode}"
    benchmark.extra_info.update({"op": "ceiling_matmul", "provider": "torch", "mode": mode, "shape": str((n, n, n)),
                                 "dtype": str(DTYPE).removeprefix("torch."), "device": DEVICE, "peak_mem_mb": None})
    _time(benchmark, lambda: torch.mm(a, b), lambda sec: {"tflops": 2 * n**3 / sec / 1e12})

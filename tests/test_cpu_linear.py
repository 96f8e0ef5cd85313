"""geb.cpu_linear and geb/gemv.cpp: int8 stays close to fp32, the fp32 formats equal plain fp32 up to summation
order, geb's fp32 kernels (AVX2 and AVX-512) against fp64 on odd shapes, long prompts on oneDNN, a stale build lock
is removed."""

import copy
import mmap
import os
import shutil
import subprocess
import sys
import time

import gguf
import pytest
import torch

from geb import cpu_linear
from geb.cpu_linear import (
    Q4_MAX_TILED_ROWS,
    ChannelInt8Linear,
    F32Linear,
    Int4Linear,
    Q8Linear,
    _clear_stale_build_lock,
    convert_for_cpu,
    dequantize_int8_rows,
    dequantize_q4_0,
    dequantize_q8_0,
    int8_method,
    load_gemv,
    move_to_huge_pages,
    q4_kernels,
    quantize_int8,
    quantize_int8_rows,
    quantize_q4_0,
    quantize_q8_0,
    use_q4_kernel,
)
from geb.generate import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Thunder and lightning. Enter three Witches. 新华社北京电"
# The int8 check's input: the play's opening line. Dynamic int8 shares one activation scale per call, so the worst
# position depends on the input; on TEXT the session's tiny model has one position at cosine 0.981.
INT8_TEXT = "When shall we three meet again in thunder, lightning, or in rain?"


@pytest.mark.parametrize("method", ["geb", "fbgemm", "woq", "fused"])
def test_int8_logits_close_to_fp32(tiny_model, tokenizer, method):
    model = tiny_model
    if method == "geb":
        _needs_gemv()
    idx = torch.tensor([tokenizer.encode(INT8_TEXT)[:48]])
    with torch.no_grad():
        ref, _ = model(idx)
        q = copy.deepcopy(model)
        if method == "fused":  # what infer_cpu.py --quant int8 runs: geb's kernel where it builds
            want = int8_method()
            assert convert_for_cpu(q, "int8") == want and q.layers[0].mlp.gate_up_proj is not None
        else:
            assert quantize_int8(q, method) == method
        got, _ = q(idx)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules()), "every linear, LM head included"
    cos = torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1)
    assert cos.min().item() >= 0.99, cos.min().item()
    # Decoding through the int8 model works with the static cache too.
    assert len(list(Decoder(q).generate(idx[0].tolist(), 5, temperature=0.0))) == 5


def test_unknown_formats_are_refused(tiny_model):
    with pytest.raises(ValueError, match="quantization method must be one of .* got 'ao'"):
        quantize_int8(tiny_model, "ao")
    with pytest.raises(ValueError, match=r"quant must be one of \('none', 'int8', 'q8_0', 'int4'\), got 'int3'"):
        convert_for_cpu(tiny_model, "int3")


@pytest.mark.parametrize("weights", ["plain", "onednn", "gemv"])
def test_fused_fp32_formats_match_plain(tiny_model, tokenizer, weights, monkeypatch):
    model = tiny_model
    idx = torch.tensor([tokenizer.encode(TEXT)[:48]])
    converted = copy.deepcopy(model)
    if weights != "gemv":  # what a machine without a C++ compiler (and, for "plain", without oneDNN) gets
        monkeypatch.setattr("geb.cpu_linear.load_gemv", lambda: False)
    if weights == "plain":
        monkeypatch.setattr("torch.backends.mkldnn.is_available", lambda: False)
    fmt = convert_for_cpu(converted, "none")
    if fmt != weights:
        pytest.skip(f"this machine cannot run {weights} weights")
    assert all(layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None
               for layer in converted.layers)
    linears = [m for m in converted.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (4 * len(converted.layers) + 1 if weights == "plain" else 0), "every linear, LM head"
    with torch.no_grad():
        ref64, _ = copy.deepcopy(model).double()(idx)
        plain, _ = model(idx)
        got, _ = converted(idx)  # a 48-token prefill: the batch-1 formats serve longer inputs too
    # Same values up to summation order: within twice plain fp32's own error against fp64.
    assert (got.double() - ref64).abs().max() <= 2 * (plain.double() - ref64).abs().max() + 1e-6
    prompt = idx[0, :8].tolist()
    assert list(Decoder(converted).generate(prompt, 30, temperature=0.0)) == \
        list(Decoder(model).generate(prompt, 30, temperature=0.0))


def test_gemv_kernel_against_fp64(q4_kernel):
    """geb/gemv.cpp's fp32 kernels (AVX2 and AVX-512) on odd shapes (row counts not a multiple of their row groups,
    lengths not a multiple of their vectors), with and without bias: one input row (the matrix-vector kernel), 2-17
    and 64 rows (the tiled kernel, input counts not a multiple of its 3 or 4) and 65 (at::linear), contiguous or not,
    against fp64."""
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the module runs on one thread; the kernels split rows between threads
    cases = [(1, 1), (3, 5), (4, 16), (7, 17), (13, 47), (130, 300), (515, 2048), (2051, 96)]
    try:
        for n, k in cases:
            _check_linear_f32(n, k)
    finally:
        torch.set_num_threads(threads)
    assert use_q4_kernel() == q4_kernel
    with pytest.raises(RuntimeError, match="last dimension must be 16"):
        torch.ops.geb.linear_f32(torch.randn(1, 15), torch.randn(4, 16), None)
    with pytest.raises(RuntimeError, match=r"bias must be float32 of shape \[4\]"):
        torch.ops.geb.linear_f32(torch.randn(1, 16), torch.randn(4, 16), torch.randn(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="no backward"):
        torch.ops.geb.linear_f32(torch.randn(1, 16, requires_grad=True), torch.randn(4, 16), None)


def _check_linear_f32(n: int, k: int) -> None:
    """geb::linear_f32 with an n x k weight, with and without bias, on every input layout, against fp64."""
    w, b = torch.randn(n, k), torch.randn(n)
    inputs = (torch.randn(k), torch.randn(1, 1, k), torch.randn(k, 2).t()[:1], torch.randn(2, 2, k),
              torch.randn(k, 7).t(), *(torch.randn(m, k) for m in range(2, 18)), torch.randn(1, 64, k),
              torch.randn(65, k))
    for x in inputs:
        for bias in (None, b):
            got = torch.ops.geb.linear_f32(x, w, bias)
            ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            assert got.shape == ref.shape and got.dtype == torch.float32
            # fp32 rounding of a k-term dot product and of the bias: within a few ulps of their magnitude.
            eps = torch.finfo(torch.float32).eps
            tol = 4 * k ** 0.5 * eps * (x.abs().double() @ w.abs().double().t()).max() + eps * b.abs().max()
            assert (got.double() - ref).abs().max() <= tol, (n, k, tuple(x.shape))


def test_f32_linear_short_and_long_prompts(q4_kernel):
    """F32Linear: up to MAX_ROWS input rows on geb's kernels (AVX2 and AVX-512), more on oneDNN's GEMM over the same
    plain weight; both equal fp64 up to rounding, with and without bias."""
    torch.manual_seed(4)
    for bias in (False, True):
        linear = torch.nn.Linear(97, 71, bias=bias)
        layer = F32Linear(linear)
        assert layer.onednn_long_prompts == torch.backends.mkldnn.is_available()
        for rows in (*range(1, 18), F32Linear.MAX_ROWS, F32Linear.MAX_ROWS + 1, 200):
            x = torch.randn(1, rows, 97)
            with torch.no_grad():
                got, ref = layer(x), linear.double()(x.double())
                linear.float()
            assert got.shape == (1, rows, 71) and (got.double() - ref).abs().max() < 1e-4, rows


def test_stale_build_lock_is_removed(tmp_path):
    """A lock left by a killed build of geb/gemv.cpp would make torch wait forever: an old one is removed, a fresh
    one (a build in progress elsewhere) is kept."""
    lock = tmp_path / "lock"
    lock.touch()
    _clear_stale_build_lock(tmp_path)
    assert lock.exists()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    with pytest.warns(UserWarning, match=f"removing {lock}: a build lock 60 minutes old"):
        _clear_stale_build_lock(tmp_path)
    assert not lock.exists()
    _clear_stale_build_lock(tmp_path)  # no lock: nothing to do


def _needs_gemv() -> None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or shutil.which("c++") is None:
        pytest.skip("geb's kernel needs an AVX2 CPU and a C++ compiler")
    assert load_gemv(), "geb/gemv.cpp failed to build (see the warning)"


# geb's block formats: (quantize, dequantize, kernel, gguf type, stored dtype, stored columns per weight column).
FORMATS = {"q4_0": (quantize_q4_0, dequantize_q4_0, "linear_q4", gguf.GGMLQuantizationType.Q4_0, torch.uint8, 0.5),
           "q8_0": (quantize_q8_0, dequantize_q8_0, "linear_q8", gguf.GGMLQuantizationType.Q8_0, torch.int8, 1)}


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (7, 288), (64, 2048)])
def test_block_formats_are_ggml_s(shape, fmt):
    """geb's Q4_0 and Q8_0 weights dequantize to exactly what gguf's reference quantizers (ggml's
    quantize_row_q4_0_ref / q8_0_ref) give."""
    quantize, dequantize, _, q, dtype, cols = FORMATS[fmt]
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    w[0, :7] = 0  # an all-zero start (a zero block when K is 32)
    want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q), q)
    qs, scales = quantize(w)
    assert qs.dtype == dtype and scales.dtype == torch.float16 and qs.shape[1] % (256 * cols) == 0
    assert torch.equal(dequantize(qs, scales, shape[1], shape[0]), torch.from_numpy(want))


def _q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: int8 per block of 32 (ggml's Q8_0 rule, round half to even), dequantized, fp64."""
    k = x.shape[-1]
    kp = -(-k // 32) * 32
    b = torch.nn.functional.pad(x, (0, kp - k)).reshape(*x.shape[:-1], kp // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(b * inv).double() * d.double()).reshape(*x.shape[:-1], kp)[..., :k]


def _kernel(fmt: str, x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """geb/gemv.cpp's operator of fmt on (qs, scales) of an n x k weight (Q4_0's also takes n: its rows are padded)."""
    if fmt == "q4_0":
        return torch.ops.geb.linear_q4(x, qs, scales, k, n)
    return torch.ops.geb.linear_q8(x, qs, scales, k)


def _check_linear_blocks(fmt: str, n: int, k: int, m: int) -> None:
    quantize, dequantize, kernel, *_ = FORMATS[fmt]
    w = torch.randn(n, k) * (0.5 + torch.rand(n, 1))
    x = torch.randn(m, k) * (0.5 + torch.rand(m, 1))
    qs, scales = quantize(w)
    wd = dequantize(qs, scales, k, n).double()
    with torch.no_grad():
        y = _kernel(fmt, x, qs, scales, k, n)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # Up to Q4_MAX_TILED_ROWS inputs the kernel quantizes them to int8 blocks; beyond, fp32 GEMM on dequantized rows.
    xq = _q8_blocks(x) if m <= Q4_MAX_TILED_ROWS else x.double()
    ref = xq @ wd.t()
    # Integer block sums are exact: what is left is fp32 rounding of the scales' products and the sums.
    bound = 1e-5 * (xq.abs() @ wd.abs().t()) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() / bound).max().item()
    # Against the unquantized activations: int8 per block of 32 loses little (a cosine over as few as 3 outputs of
    # 47-long rows can reach 0.998).
    cos = torch.nn.functional.cosine_similarity(y.double(), x.double() @ wd.t(), dim=-1)
    assert cos.min() > 0.995, cos.min().item()


@pytest.fixture(params=["avx2", "vnni"])
def q4_kernel(request):
    """Each of geb/gemv.cpp's Q4_0 kernels in turn (skipped where the CPU lacks it); the default restored after."""
    _needs_gemv()
    if request.param not in q4_kernels():
        pytest.skip(f"this CPU has no {request.param} kernel")
    default = use_q4_kernel()
    use_q4_kernel(request.param)
    yield request.param
    use_q4_kernel(default)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_block_kernels_against_fp64(q4_kernel, fmt):
    """geb/gemv.cpp's Q4_0 and Q8_0 kernels (AVX2 and AVX-512 VNNI) against fp64 of the same block-dequantized weights
    and int8 activation blocks: one token and prompt tiles (input counts not a multiple of the tiles' 3 or 4), row
    counts not a multiple of 4, lengths not a multiple of 32 or 256, an LM-head-like matrix of many rows; and long
    prompts (fp32 GEMM on dequantized rows, in chunks of 256 rows) against fp64 of the unquantized activations."""
    torch.manual_seed(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, k in [(1, 32), (3, 47), (4, 256), (7, 96), (13, 300), (130, 2048), (515, 704), (4099, 96)]:
            for m in (1, 2, 3, 5, 7, 17):
                _check_linear_blocks(fmt, n, k, m)
        for n, k in [(3, 47), (515, 300)]:
            _check_linear_blocks(fmt, n, k, Q4_MAX_TILED_ROWS + 1)
    finally:
        torch.set_num_threads(threads)
    assert use_q4_kernel() == q4_kernel
    quantize, *_ = FORMATS[fmt]
    with pytest.raises(RuntimeError, match="last dimension must be 96"):
        _kernel(fmt, torch.randn(1, 95), *quantize(torch.randn(4, 96)), 96, 4)
    with pytest.raises(RuntimeError, match="no backward"):
        _kernel(fmt, torch.randn(1, 96, requires_grad=True), *quantize(torch.randn(4, 96)), 96, 4)
    if fmt == "q4_0":
        with pytest.raises(RuntimeError, match=r"qs must hold 32 rows \(out_features 17 rounded up"):
            _kernel(fmt, torch.randn(1, 96), *quantize(torch.randn(4, 96)), 96, 17)


def test_int8_rows_format():
    """quantize_int8_rows: one scale a row (max |w| / 127), round to nearest, the sums the VNNI kernel subtracts, and
    dequantize_int8_rows inverts the interleaving (odd sizes, zero rows and a zero row)."""
    for n, k in [(1, 5), (17, 64), (40, 300)]:
        w = torch.randn(n, k) * (0.1 + torch.rand(n, 1))
        w[0] = 0
        qs, scales, sums = quantize_int8_rows(w)
        assert qs.shape == (-(-n // 16) * 16, -(-k // 64) * 64) and qs.dtype == torch.int8
        d = w.abs().amax(1) / 127
        q = torch.round(w * torch.where(d == 0, 0, 1 / d)[:, None])
        assert torch.equal(dequantize_int8_rows(qs, scales, k, n), q * d[:, None])
        assert torch.equal(sums[:n], 128 * q.sum(1).int()) and not sums[n:].any()


def _check_linear_i8(n: int, k: int, m: int) -> None:
    w = torch.randn(n, k) * (0.5 + torch.rand(n, 1))
    x = torch.randn(m, k) * (0.5 + torch.rand(m, 1))
    qs, scales, sums = quantize_int8_rows(w)
    wd = dequantize_int8_rows(qs, scales, k, n).double()
    with torch.no_grad():
        y = torch.ops.geb.linear_i8(x, qs, scales, sums, k, n)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if m <= Q4_MAX_TILED_ROWS:  # activations quantized per row (round half to even), as the kernel does
        d = x.abs().amax(1, keepdim=True) / 127
        xq = torch.round(x * (1 / d)).double() * d.double()
    else:  # long prompts: fp32 GEMM on the dequantized weight
        xq = x.double()
    ref = xq @ wd.t()
    bound = 1e-5 * (xq.abs() @ wd.abs().t()) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() / bound).max().item()


def test_int8_rows_kernel_against_fp64(q4_kernel):
    """geb::linear_i8 (AVX2 and AVX-512 VNNI) against fp64 of the same int8 weights and activations: one token and
    prompt tiles (input counts off the tiles' 8 / 4 / 2), row counts off the groups of 16, lengths off 4 and 64, an
    LM-head-like matrix; long prompts through fp32 GEMM; bad shapes refused in one line."""
    torch.manual_seed(6)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, k in [(1, 32), (3, 47), (16, 64), (37, 300), (130, 2048), (4099, 96), (24, 5632)]:
            for m in (1, 2, 3, 5, 7, 13, 17):
                _check_linear_i8(n, k, m)
        _check_linear_i8(37, 300, Q4_MAX_TILED_ROWS + 1)
    finally:
        torch.set_num_threads(threads)
    assert use_q4_kernel() == q4_kernel
    qs, scales, sums = quantize_int8_rows(torch.randn(4, 96))
    with pytest.raises(RuntimeError, match="last dimension must be 96"):
        torch.ops.geb.linear_i8(torch.randn(1, 95), qs, scales, sums, 96, 4)
    with pytest.raises(RuntimeError, match=r"qs must be a contiguous int8 tensor of \[32, in_features 96"):
        torch.ops.geb.linear_i8(torch.randn(1, 96), qs, scales, sums, 96, 17)
    with pytest.raises(RuntimeError, match="no backward"):
        torch.ops.geb.linear_i8(torch.randn(1, 96, requires_grad=True), qs, scales, sums, 96, 4)


def test_quantized_weights_move_to_huge_pages():
    """move_to_huge_pages (what convert_for_cpu does for int4 / int8 / q8_0) copies every quantized buffer of 2 MiB
    or more into a mapping of its own starting on a 2 MiB boundary, leaves smaller ones, and changes no output."""
    _needs_gemv()
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages advice on this OS")
    torch.manual_seed(7)
    model = torch.nn.Sequential(Int4Linear(torch.nn.Linear(4096, 2048)), ChannelInt8Linear(torch.nn.Linear(2048, 1536)))
    x = torch.randn(3, 4096)
    with torch.no_grad():
        before = model(x)
        large = [(m, n) for m in model for n in ("qs", "scales", "sums") if hasattr(m, n)
                 and getattr(m, n).nbytes >= 2 << 20]
        small = {n: getattr(m, n).data_ptr() for m in model for n in ("scales", "sums") if hasattr(m, n)}
        old = [getattr(m, n).data_ptr() for m, n in large]
        moved = move_to_huge_pages(model)
        after = model(x)
    assert [n for _, n in large] == ["qs", "qs"] and moved == sum(getattr(m, n).nbytes for m, n in large)
    regions = [torch.frombuffer(r, dtype=torch.uint8) for r in cpu_linear._ARENAS]
    for (m, n), p in zip(large, old, strict=True):
        t = getattr(m, n)
        assert t.data_ptr() != p and t.data_ptr() % (2 << 20) == 0
        assert any(r.data_ptr() <= t.data_ptr() < r.data_ptr() + r.numel() for r in regions)
    assert small == {n: getattr(m, n).data_ptr() for m in model for n in ("scales", "sums") if hasattr(m, n)}
    assert torch.equal(after, before)


def test_q4_kernel_choice():
    """AVX-512 VNNI by default where the CPU has it; GEB_CPU_ISA=avx2 forces AVX2 from the start; a bad name is
    refused."""
    _needs_gemv()
    assert use_q4_kernel() == q4_kernels()[-1]
    with pytest.raises(RuntimeError, match="isa must be 'avx2', 'vnni' or ''"):
        use_q4_kernel("avx512")
    code = "from geb.cpu_linear import use_q4_kernel; print(use_q4_kernel())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GEB_CPU_ISA": "avx2"}, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "avx2"


@pytest.mark.parametrize("quant", ["int4", "q8_0"])
def test_block_quant_logits_close_to_fp32(tiny_model, tokenizer, q4_kernel, quant):
    """--quant int4 / q8_0 on the trained tiny model: every linear (LM head included) in Q4_0 / Q8_0, logits close to
    fp32."""
    idx = torch.tensor([tokenizer.encode(INT8_TEXT)[:48]])
    with torch.no_grad():
        ref, _ = tiny_model(idx)
        q = copy.deepcopy(tiny_model)
        assert convert_for_cpu(q, quant) == {"int4": "q4_0", "q8_0": "q8_0"}[quant]
        got, _ = q(idx)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules()), "every linear, LM head included"
    assert isinstance(q.lm_head, {"int4": Int4Linear, "q8_0": Q8Linear}[quant])
    cos = torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1)
    assert cos.min().item() >= {"int4": 0.98, "q8_0": 0.999}[quant], cos.min().item()
    tokens = idx[0].tolist()
    assert len(list(Decoder(q).generate(tokens, 5, temperature=0.0))) == 5

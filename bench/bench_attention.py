"""Attention on a GPU: geb's Triton FlashAttention against SDPA's flash and cuDNN backends and FlexAttention, dense
and with document masking (varlen), in device time; and, on any machine, the sm_90 build of every kernel config.

    python -m bench.bench_attention [--json OUT.jsonl]   # GPU: markdown tables on stdout, one row as soon as measured
    python -m bench.bench_attention --sm90                # offline Hopper build: registers, spills, smem, HGMMA, TMA

Device time is `triton.testing.do_bench` (CUDA events, L2 flushed, median). TFLOP/s count only the FLOPs the mask
leaves: 4 * sum over documents of Lq * Lk * Hq * D forward, halved when causal (FlashAttention's convention), x3.5
for forward+backward. Every provider's forward is checked by the kernel tests' rule against fp32 SDPA before it is
timed; a row says "FAIL" where it misses. Under pytest (`pytest bench/`) the GPU run is one `gpu` test, skipped
without a GPU; the FLOP counting is checked everywhere.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels
from kernels import flash_attn as fa
from kernels import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # kernel_check: the one correctness rule
from kernel_check import assert_rule  # noqa: E402

# (B, T, Hq, Hkv, D, causal): GEB-1.3B's attention (16/4 heads, hd 128) at 1k-8k tokens, non-causal, and hd 64
# (32/8). Five shapes keep `bash bench/gpu.sh OUT attention` near 4 minutes with autotuning and FlexAttention's
# compilation; --all-shapes adds T = 4k and 16k and hd 64 at 8k.
DENSE_SHAPES = [
    (8, 2048, 16, 4, 128, True), (16, 1024, 16, 4, 128, True), (2, 8192, 16, 4, 128, True),
    (8, 2048, 16, 4, 128, False), (8, 2048, 32, 8, 64, True),
]
MORE_SHAPES = [(4, 4096, 16, 4, 128, True), (1, 16384, 16, 4, 128, True), (2, 8192, 32, 8, 64, True)]
ROW_TOKENS, ROWS = 8192, 4  # varlen: 4 packed rows of 8k tokens


def document_lengths(kind: str) -> list[int]:
    """Per-row document lengths summing to ROW_TOKENS, for ROWS rows: 'fixed512' or a seeded 'mixed' set."""
    if kind == "fixed512":
        return [512] * (ROW_TOKENS // 512) * ROWS
    gen = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(ROWS):
        left = ROW_TOKENS
        while left:
            n = min(left, max(16, int(torch.empty(1).log_normal_(6.0, 1.2, generator=gen))))
            lengths.append(n)
            left -= n
    return lengths


def attention_flops(lengths_q: list[int], lengths_k: list[int], h_q: int, d: int, causal: bool, mode: str) -> float:
    """Matmul FLOPs the mask leaves: 4 * Lq * Lk * Hq * D per document, halved when causal, x3.5 for fwd+bwd."""
    pairs = sum(lq * lk for lq, lk in zip(lengths_q, lengths_k, strict=True))
    return 4.0 * pairs * h_q * d / (2 if causal else 1) * (3.5 if mode == "fwd_bwd" else 1.0)


def test_attention_flops_count_only_documents():
    lengths = document_lengths("fixed512")
    assert sum(lengths) == ROWS * ROW_TOKENS and sum(document_lengths("mixed")) == ROWS * ROW_TOKENS
    dense = attention_flops([ROW_TOKENS] * ROWS, [ROW_TOKENS] * ROWS, 16, 128, True, "fwd")
    assert dense / attention_flops(lengths, lengths, 16, 128, True, "fwd") == 16  # 8k rows of 512-token documents
    assert attention_flops([3], [5], 2, 8, False, "fwd_bwd") == 4 * 15 * 2 * 8 * 3.5


# ---------------------------------------------------------------------------------------------------------------
# Providers: each returns fn(q, k, v) on the layout it is given.
# ---------------------------------------------------------------------------------------------------------------
def _sdpa(backend, causal: bool, mask: torch.Tensor | None = None) -> Callable:
    def attn(q, k, v):
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel(backend):
            try:
                out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, is_causal=causal and mask is None,
                                                     enable_gqa=True)
            except RuntimeError:  # a backend without native GQA: repeat K/V
                rep = q.shape[2] // k.shape[2]
                out = F.scaled_dot_product_attention(q_t, k_t.repeat_interleave(rep, 1), v_t.repeat_interleave(rep, 1),
                                                     attn_mask=mask, is_causal=causal and mask is None)
        return out.transpose(1, 2)
    return attn


def _flex(causal: bool, doc_ids: torch.Tensor | None, b: int, t: int) -> Callable:
    """Compiled FlexAttention with a (document-)causal BlockMask; doc_ids (B, T) is each token's document."""
    def mask_mod(b_i, h, q_i, k_i):
        keep = q_i >= k_i if causal else q_i >= 0
        return keep & (doc_ids[b_i, q_i] == doc_ids[b_i, k_i]) if doc_ids is not None else keep

    compiled = torch.compile(flex_attention, dynamic=False)
    made = {}  # the BlockMask, built at the first call: inside _measure, whose errors become a "-" cell

    def attn(q, k, v):
        if "mask" not in made:
            masked = causal or doc_ids is not None
            made["mask"] = create_block_mask(mask_mod, b, None, t, t, device="cuda") if masked else None
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=made["mask"],
                       enable_gqa=True)
        return out.transpose(1, 2)
    return attn


def _config_name(kernel) -> str:
    """The autotuner's pick for a kernel's last key: tile, warps, stages and variant."""
    c = getattr(kernel, "best_config", None)
    if c is None:
        return "?"
    variant = "+".join(n for n, on in (("tma", c.kwargs["TMA"]), ("ws", c.kwargs["WARP_SPEC"])) if on) or "plain"
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages} {variant}"


# ---------------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------------
def _time(fn: Callable, inputs: list[torch.Tensor], mode: str) -> float:
    """Median device ms of fn(*inputs), or of its forward + backward."""
    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100, return_mode="median")
    leaves = [t.detach().requires_grad_() for t in inputs]
    do = torch.randn_like(fn(*leaves))

    def step():
        torch.autograd.grad(fn(*leaves), leaves, do)
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def _checked(fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor]) -> bool:
    """fn's forward within the rule against fp32 ref_fn (bf16 ref_fn as the same-dtype baseline)."""
    with torch.no_grad():
        out = fn(*inputs)
        ref = ref_fn(*[t.float() for t in inputs])
        same = ref_fn(*inputs)
    try:
        assert_rule("out", out, ref, same)
        return True
    except AssertionError as e:
        print(f"<!-- check failed: {e} -->", flush=True)
        return False


def _measure(name: str, fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor], modes: list[str],
             flops: Callable[[str], float]) -> dict:
    """TFLOP/s per mode of one provider; None where it fails to run, negative where it misses the rule."""
    try:
        ok = _checked(fn, ref_fn, inputs)
        res = {mode: flops(mode) / (_time(fn, inputs, mode) * 1e-3) / 1e12 for mode in modes}
    except Exception as e:  # a backend that refuses the shape or dtype (or runs out of memory)
        print(f"<!-- {name}: {type(e).__name__}: {str(e)[:200]} -->", flush=True)
        return dict.fromkeys(modes)
    return {m: (v if ok else -v) for m, v in res.items()}


def _cell(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 0 else f"{-v:.0f} FAIL")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{abs(a) / abs(b):.2f}x"


def _rows_layout(fn: Callable, total: int) -> Callable:
    """fn on (ROWS, ROW_TOKENS, H, D) views of packed (total, H, D) tensors, its output packed back."""
    def packed(q, k, v):
        out = fn(*(t.view(ROWS, ROW_TOKENS, *t.shape[1:]) for t in (q, k, v)))
        return out.reshape(total, *out.shape[2:])
    return packed


def dense_row(shape: tuple, out_json) -> None:
    """One shape of the dense table: geb vs SDPA flash, SDPA cuDNN and FlexAttention, fwd and fwd+bwd."""
    b, t, h_q, h_kv, d, causal = shape
    q = torch.randn(b, t, h_q, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, t, h_kv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, t, h_kv, d, device="cuda", dtype=torch.bfloat16)
    providers = {
        "geb": lambda q, k, v: kernels.flash_attn_func(q, k, v, causal=causal, impl="triton"),
        "flash": _sdpa(SDPBackend.FLASH_ATTENTION, causal), "cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, causal),
        "flex": _flex(causal, None, b, t),
    }
    res, configs = {}, {}
    for name, fn in providers.items():
        res[name] = _measure(name, fn, lambda q, k, v: reference.attention_ref(q, k, v, causal, d ** -0.5),
                             [q, k, v], ["fwd", "fwd_bwd"],
                             lambda mode: attention_flops([t] * b, [t] * b, h_q, d, causal, mode))
        if name == "geb":
            configs = {"fwd": _config_name(fa._attn_fwd_kernel),
                       "fwd_bwd": f"{_config_name(fa._attn_bwd_dkdv_kernel)}; {_config_name(fa._attn_bwd_dq_kernel)}"}
    for mode in ("fwd", "fwd_bwd"):
        r = {n: res[n][mode] for n in providers}
        print(f"| {shape} | {mode} | {_cell(r['geb'])} | {_cell(r['flash'])} | {_cell(r['cudnn'])} | "
              f"{_cell(r['flex'])} | {_ratio(r['geb'], r['flash'])} | {_ratio(r['geb'], r['cudnn'])} | "
              f"{configs.get(mode, '')} |", flush=True)
        _write(out_json, {"table": "dense", "shape": list(shape), "mode": mode, "tflops": r,
                          "config": configs.get(mode)})


def varlen_row(kind: str, out_json, h_q: int = 16, h_kv: int = 4, d: int = 128) -> None:
    """One document set of the varlen table (ROWS packed rows of ROW_TOKENS, causal): geb varlen, geb's dense causal
    kernel over the whole rows, FlexAttention with a document BlockMask, SDPA with a dense block-diagonal mask. All
    rates count the masked FLOPs, so a ratio of rates is a ratio of times (geb / dense geb is the speed-up)."""
    lengths = document_lengths(kind)
    total, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                      torch.tensor(lengths, device="cuda")).view(ROWS, ROW_TOKENS)
    block_diag = (doc_ids[:, :, None] == doc_ids[:, None, :]).tril()[:, None]  # (B, 1, T, T) bool
    q = torch.randn(total, h_q, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, h_kv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, h_kv, d, device="cuda", dtype=torch.bfloat16)
    ref = lambda q, k, v: reference.attention_varlen_ref(q, k, v, cu, cu, True, d ** -0.5)  # noqa: E731
    dense_ref = _rows_layout(lambda q, k, v: reference.attention_ref(q, k, v, True, d ** -0.5), total)
    providers = {
        "geb": (lambda q, k, v: kernels.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, impl="triton"), ref),
        "dense": (_rows_layout(lambda q, k, v: kernels.flash_attn_func(q, k, v, impl="triton"), total), dense_ref),
        "flex": (_rows_layout(_flex(True, doc_ids, ROWS, ROW_TOKENS), total), ref),
        "sdpa": (_rows_layout(_sdpa([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], False, block_diag), total), ref),
    }
    res = {n: _measure(n, fn, r, [q, k, v], ["fwd", "fwd_bwd"],
                       lambda mode: attention_flops(lengths, lengths, h_q, d, True, mode))
           for n, (fn, r) in providers.items()}
    for mode in ("fwd", "fwd_bwd"):
        r = {n: res[n][mode] for n in providers}
        print(f"| {kind}: {len(lengths)} documents, longest {longest} | {mode} | {_cell(r['geb'])} | "
              f"{_cell(r['dense'])} | {_cell(r['flex'])} | {_cell(r['sdpa'])} | {_ratio(r['geb'], r['flex'])} | "
              f"{_ratio(r['geb'], r['dense'])} |", flush=True)
        _write(out_json, {"table": "varlen", "documents": kind, "mode": mode, "tflops": r})


def run_dense(out_json, shapes: list[tuple]) -> None:
    """The dense table."""
    print("| shape (B, T, Hq, Hkv, D, causal) | mode | geb Triton | SDPA flash | SDPA cuDNN | FlexAttention "
          "| geb / flash | geb / cuDNN | geb config (fwd; dkdv, dq) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for shape in shapes:
        dense_row(shape, out_json)
        torch.cuda.empty_cache()


def run_varlen(out_json) -> None:
    """The varlen table: 8k-token rows of packed documents, causal, hd 128, 16/4 heads."""
    print(f"\n| documents ({ROWS} rows x {ROW_TOKENS} tokens) | mode | geb varlen | geb dense causal "
          "| FlexAttention doc mask | SDPA block-diagonal mask | geb / Flex | geb / dense geb |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("fixed512", "mixed"):
        varlen_row(kind, out_json)
        torch.cuda.empty_cache()


def _write(out_json, record: dict) -> None:
    if out_json is not None:
        out_json.write(json.dumps(record) + "\n")
        out_json.flush()


# ---------------------------------------------------------------------------------------------------------------
# Offline sm_90 build of every config (no GPU needed).
# ---------------------------------------------------------------------------------------------------------------
_POINTERS = {"q", "k", "v", "o", "do", "dk", "dv", "dq"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in _POINTERS:
            types[name] = "*" + dtype
        elif name in ("lse", "delta"):
            types[name] = "*fp32"
        elif name in ("cu_q", "cu_k"):
            types[name] = "*i32"
        else:
            types[name] = "fp32" if name in ("scale_log2", "sm_scale") else "i32"
    return types


def sm90_build(kernel, config, varlen: bool, causal: bool = True, head_dim: int = 128) -> dict:
    """Compile one config for an H100 (bf16) and read its cubin: registers, spills, shared memory, instructions."""
    fn = kernel.fn
    constexprs = dict(config.kwargs, CAUSAL=causal, VARLEN=varlen, BLOCK_D=head_dim, EVEN_D=True,
                      DOT_PRECISION="tf32")
    src = ASTSource(fn=fn, signature=_signature(fn, "bf16", constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    reg, local = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "LOCAL"))
    return {"reg": reg, "local": local, "smem": compiled.metadata.shared, "hgmma": sass.count("HGMMA"),
            "tma_loads": sass.count("UTMALDG"),
            "setmaxreg": sass.count("SETMAXREG")}


def run_sm90() -> None:
    """Print the sm_90 build of every autotune config of the three attention kernels (hd 128, bf16, causal)."""
    print(f"triton {triton.__version__}, target sm_90, bf16, head dim 128, causal\n")
    print("| kernel | tile | warps | stages | variant | layout | REG | LOCAL | smem bytes | HGMMA | UTMALDG |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for kernel in (fa._attn_fwd_kernel, fa._attn_bwd_dkdv_kernel, fa._attn_bwd_dq_kernel):
        for config in kernel.configs:
            c = config.kwargs
            variant = "+".join(n for n, on in (("tma", c["TMA"]), ("ws", c["WARP_SPEC"])) if on) or "plain"
            for varlen in (False, True):
                head = (f"| {kernel.fn.__name__} | {c['BLOCK_M']}x{c['BLOCK_N']} | {config.num_warps} | "
                        f"{config.num_stages} | {variant} | {'varlen' if varlen else 'dense'} |")
                try:
                    r = sm90_build(kernel, config, varlen)
                    print(f"{head} {r['reg']} | {r['local']} | {r['smem']} | {r['hgmma']} | {r['tma_loads']} |",
                          flush=True)
                except Exception as e:  # a config the compiler rejects: the table says so
                    print(f"{head} build failed: {str(e).splitlines()[0][:80]} |||||", flush=True)


@pytest.mark.gpu
def test_bench_attention_gpu():
    """The whole GPU run (minutes): `python -m bench.bench_attention` prints the same tables."""
    run_dense(None, DENSE_SHAPES)
    run_varlen(None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also append one JSON record per row to this file")
    ap.add_argument("--sm90", action="store_true", help="offline Hopper build of every config instead (no GPU)")
    ap.add_argument("--only", choices=["dense", "varlen"], help="run one table")
    ap.add_argument("--all-shapes", action="store_true", help="also T = 4k, 16k and hd 64 at 8k (dense)")
    args = ap.parse_args(argv)
    if args.sm90:
        run_sm90()
        return
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU (or --sm90 for the offline build)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, GEB_AUTOTUNE={os.environ.get('GEB_AUTOTUNE')}"
          f", bf16, device time (do_bench median), TFLOP/s of the FLOPs the mask leaves\n", flush=True)
    out_json = open(args.json, "a") if args.json else None  # noqa: SIM115 -- closed below
    try:
        if args.only != "varlen":
            run_dense(out_json, DENSE_SHAPES + (MORE_SHAPES if args.all_shapes else []))
        if args.only != "dense":
            run_varlen(out_json)
    finally:
        if out_json is not None:
            out_json.close()


if __name__ == "__main__":
    main()

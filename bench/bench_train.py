"""Training throughput on one device: tokens/s, MFU and peak memory of train.py's step, per kernel path.

    python -m bench.bench_train --preset geb-1.3b --batch-size 8 --seq-len 2048
    python -m bench.bench_train --preset stlm-50m --batch-size 64 --impl triton,torch --compile false,true

Each configuration builds the preset from one seed, then runs train.py's own `train_step` on random tokens at a
constant lr (fp32 weights, bf16 autocast on CUDA, fused AdamW without decay on norm weights, the spike check,
gradient clipping, and the step's two host syncs for the loss and the gradient norm): warm-up steps (which include
compiling), then timed steps.
impl "triton" runs geb's Triton kernels; "torch" runs the PyTorch references with SDPA attention. MFU counts the
model's FLOPs per token (GEB.flops_per_token) over the datasheet bf16 peak and over the bf16 matmul rate measured
here, so both are on record. One JSON line per configuration goes to --json.
"""

import argparse
import gc
import itertools
import json
import math
import time
from pathlib import Path

import torch

from geb.config import preset
from geb.model import GEB
from train import LOSSES, Run, TrainConfig, build_optimizer, gpu_peak_flops, train_step, wrap_model


def measured_matmul_flops(device: torch.device) -> float:
    """bf16 (CUDA) or fp32 (CPU) matmul rate of this device on random 8192^3 (1024^3 on CPU) operands."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset_name: str, impl: str, compile_model: bool, batch_size: int, seq_len: int, steps: int,
            warmup: int, device: torch.device, seed: int = 0, loss: str = "fused") -> dict:
    """Time `steps` training steps after `warmup` ones; returns tokens/s, losses and peak memory."""
    torch.manual_seed(seed)
    config = preset(preset_name, dropout=0.0)
    seq_len = seq_len or config.max_seq_len
    model = GEB(config, impl=impl).to(device)
    # A constant lr (no warmup, no decay) so that every timed step does the same work.
    cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len, lr=3e-4, warmup_steps=0, min_lr_ratio=1.0,
                      compile=compile_model, loss=loss)
    optimizer = build_optimizer(model, cfg)
    # A fixed pool of random batches: real-looking token ids at no data-loading cost.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.randint(0, config.vocab_size, (4, batch_size, seq_len + 1), generator=gen).to(device)
    batches = ((tokens[:, :-1], tokens[:, 1:]) for tokens in itertools.cycle(pool))
    run = Run(cfg, model=wrap_model(model, cfg, world_size=1, local_rank=0, device=device), raw_model=model,
              optimizer=optimizer, loader=batches, seq_len=seq_len, device=device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [train_step(run)["loss"] for _ in range(warmup)]
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses += [train_step(run)["loss"] for _ in range(steps)]
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = {"preset": preset_name, "impl": impl, "compile": compile_model, "loss": loss, "batch_size": batch_size,
              "seq_len": seq_len, "steps": steps, "tokens_per_s": batch_size * seq_len * steps / elapsed,
              "step_ms": 1e3 * elapsed / steps, "warmup_s": warmup_s, "peak_mem_mb": peak_mb,
              "flops_per_token": model.flops_per_token(seq_len), "params": model.num_params()["total"],
              "first_loss": losses[0], "last_loss": losses[-1]}
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss in {preset_name} impl={impl} compile={compile_model}: {losses}")
    return result


def test_measure_runs_and_learns_on_cpu():
    """The benchmark's step trains (tiny preset, CPU reference path): finite losses that go down on a fixed pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = measure("tiny", "torch", False, batch_size=2, seq_len=32, steps=8, warmup=4, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 6 * r["params"] * 0.5
    assert r["last_loss"] < r["first_loss"] - 0.1, (r["first_loss"], r["last_loss"])


def main() -> None:
    """Run every (impl, compile) combination for one preset and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="geb-1.3b")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the preset's context")
    p.add_argument("--impl", default="triton,torch" if torch.cuda.is_available() else "torch",
                   help="comma-separated: triton, torch (triton needs a GPU)")
    p.add_argument("--compile", default="false,true", help="comma-separated: false, true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss", default="fused", choices=LOSSES, help="fused (chunked, no full logits) or full logits")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per configuration here")
    args = p.parse_args()
    impls = [i.strip() for i in args.impl.split(",")]
    if any(i not in ("triton", "torch") for i in impls):
        p.error(f"--impl takes triton and/or torch, comma-separated; got {args.impl!r}")
    compiles = [c.strip().lower() for c in args.compile.split(",")]
    if any(c not in ("true", "false") for c in compiles):
        p.error(f"--compile takes false and/or true, comma-separated; got {args.compile!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured = measured_matmul_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = gpu_peak_flops(device)
    print(f"device {name}; measured matmul {measured / 1e12:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    print("| preset | impl | compile | batch x seq | tokens/s | step ms | MFU (datasheet) | MFU (measured) | "
          "peak GiB | warm-up s | loss first -> last |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for impl in impls:
        for compile_model in (c == "true" for c in compiles):
            try:
                r = measure(args.preset, impl, compile_model, args.batch_size, args.seq_len, args.steps,
                            args.warmup, device, loss=args.loss)
            except torch.OutOfMemoryError:
                print(f"| {args.preset} | {impl} | {compile_model} | out of memory at batch {args.batch_size} |")
                continue
            finally:  # the last configuration's model and optimizer state must go before the next is built
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            achieved = r["flops_per_token"] * r["tokens_per_s"]
            r.update(device=name, torch=torch.__version__, measured_matmul_flops=measured,
                     mfu_datasheet=achieved / datasheet if datasheet else None, mfu_measured=achieved / measured)
            mfu_d = f"{r['mfu_datasheet']:.1%}" if datasheet else "-"
            peak = f"{r['peak_mem_mb'] / 1024:.1f}" if r["peak_mem_mb"] else "-"
            print(f"| {r['preset']} | {impl}, {args.loss} loss | {compile_model} | {r['batch_size']}x{r['seq_len']} | "
                  f"{r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {mfu_d} | {r['mfu_measured']:.1%} | {peak} | "
                  f"{r['warmup_s']:.1f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

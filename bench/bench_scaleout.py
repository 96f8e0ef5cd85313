"""Scale-out memory and throughput: per-rank peak RSS and tokens/s of train.py's step under DDP, --zero and --fsdp,
with and without --ac, on CPU ranks over Gloo.

    python -m bench.bench_scaleout --preset stlm-50m --batch-size 4 --seq-len 256
    python -m bench.bench_scaleout --preset geb-1.3b --d-model 1024 --n-layers 16 --n-heads 16 --ffn-dim 2816 \\
        --batch-size 1 --seq-len 128 --rounds 1 --modes fsdp,zero,ddp
    python -m bench.bench_scaleout --preset stlm-50m --batch-size 2 --seq-len 256 --activations --acs none,full
    python -m bench.bench_scaleout --collectives

The driver launches one `torchrun --standalone --nproc_per_node=NPROC` per configuration (peak RSS is a process's
high-water mark, so every configuration needs fresh processes), in interleaved rounds, and prints a table. Each rank
builds the model from one seed, applies train.py's parallelize / build_optimizer / wrap_model, runs one warm-up
train_step on random tokens (it allocates the gradients and the AdamW state), then --steps timed ones.

Memory is split without guessing from RSS alone: `state` is counted from the tensors this rank holds after the
warm-up step (its parameters, as many bytes again for their gradients, its AdamW state; local shards under FSDP and
ZeRO); `base` is the rank's RSS before the model is built (the PyTorch runtime and the process group); the rest of
the peak, peak - base - state, is activations, the gradients' transients and FSDP's all-gathered blocks.

--collectives times Gloo's all-reduce, all-gather and reduce-scatter of one buffer against the ones geb's FSDP uses
on CPU ranks (geb/parallelize.py).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from geb.config import preset
from geb.model import GEB
from geb.parallelize import GlooAllGather, GlooReduceScatter, parallelize
from train import Run, TrainConfig, build_optimizer, setup_distributed, train_step, wrap_model

ROOT = Path(__file__).resolve().parent.parent
MODES = ("ddp", "zero", "fsdp")
OVERRIDES = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")


def rss_mib() -> float:
    """This process's current resident set size in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of the part of t this rank holds."""
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def state_mib(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """MiB of this rank's parameters, their gradients (as many bytes) and its AdamW state."""
    params = sum(local_bytes(p) for p in model.parameters())
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    adam = sum(local_bytes(v) for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return (2 * params + adam) / 2**20


def random_batches(vocab: int, batch_size: int, seq_len: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless (inputs, targets) of random tokens."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def loss_gradients(loss: torch.Tensor) -> set[int]:
    """Storages the fused loss saved for the backward: the gradients of the LM head (and of its input) it computes in
    the forward, as Liger-Kernel's does; they are gradients, counted apart from the activations."""
    found, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("LinearCrossEntropyFunction"):
            found |= {t.untyped_storage().data_ptr() for t in node.saved_tensors}
        todo += [next_node for next_node, _ in node.next_functions]
    return found


def saved_activations(args: argparse.Namespace, ac: str) -> tuple[float, float, float]:
    """MiB of the distinct tensors autograd keeps for the backward apart from the weights (the activations; a
    checkpointed block keeps only its input), MiB of the gradients the fused loss computes in the forward and keeps,
    and the seconds of one forward + backward; one process, one micro-batch of random tokens."""
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    config = preset(args.preset, max_seq_len=args.seq_len, dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = GEB(config)
    parallelize(model, torch.device("cpu"), ac=ac)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, y = next(random_batches(config.vocab_size, args.batch_size, args.seq_len, 0))
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y, logits="none")
    grads = loss_gradients(loss)
    loss.backward()
    elapsed = time.perf_counter() - t0
    activations = sum(n for ptr, n in saved.items() if ptr not in weights and ptr not in grads)
    return activations / 2**20, sum(saved.get(ptr, 0) for ptr in grads) / 2**20, elapsed


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: build, warm up, time --steps steps; rank 0 prints a JSON line of all ranks."""
    rank, local_rank, world_size, device = setup_distributed()
    base = rss_mib()
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    config = preset(args.preset, max_seq_len=args.seq_len, dropout=0.0, **overrides)
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, zero=args.mode == "zero",
                      fsdp=args.mode == "fsdp", ac=args.ac, lr=1e-4, warmup_steps=0, spike_factor=0.0)
    torch.manual_seed(0)
    model = GEB(config).to(device)
    parallelize(model, device, fsdp=cfg.fsdp, ac=cfg.ac)
    optimizer = build_optimizer(model, cfg, world_size)
    run = Run(cfg, model=wrap_model(model, cfg, world_size, local_rank, device), raw_model=model, optimizer=optimizer,
              loader=random_batches(config.vocab_size, args.batch_size, args.seq_len, rank), seq_len=args.seq_len,
              device=device, rank=rank, world_size=world_size)
    run.state.step = 1  # past the first-batch check, which only prints
    train_step(run)
    state = state_mib(model, optimizer)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(run)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    mine = {"rank": rank, "base_mib": base, "state_mib": state,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ranks = [None] * world_size
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        tokens = args.steps * args.batch_size * args.seq_len * world_size
        params = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the whole parameter's
        print("RESULT " + json.dumps({"mode": args.mode, "ac": args.ac, "params": params,
                                      "tokens_per_s": tokens / elapsed, "ranks": ranks}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def time_collectives(mib: int, repeats: int = 7) -> None:
    """One rank: median milliseconds of Gloo's collectives and geb's on one fp32 buffer of mib MiB; rank 0 prints."""
    dist.init_process_group("gloo")
    group, n, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    full, out = torch.randn(mib * 2**18), torch.empty(mib * 2**18)
    shard = torch.randn(full.numel() // n)

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    rows = {"all_reduce (DDP)": median_ms(lambda: dist.all_reduce(full)),
            "all_gather_single (Gloo)": median_ms(lambda: dist.all_gather_single(out, shard)),
            "GlooAllGather (geb)": median_ms(lambda: GlooAllGather()(out, shard, group)),
            "reduce_scatter_single (Gloo)": median_ms(lambda: dist.reduce_scatter_single(shard, full)),
            "GlooReduceScatter (geb)": median_ms(lambda: GlooReduceScatter()(shard, full, group, dist.ReduceOp.SUM))}
    if rank == 0:
        print(f"{n} ranks, one {mib} MiB fp32 buffer, median of {repeats}; load {os.getloadavg()[0]:.1f}")
        print("| collective | ms |\n|---|---|")
        for name, ms in rows.items():
            print(f"| {name} | {ms:.1f} |")
    dist.destroy_process_group()


def launch(args: argparse.Namespace, mode: str, ac: str) -> dict:
    """One configuration under torchrun; its RESULT line."""
    flags = [f"--preset={args.preset}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}",
             f"--steps={args.steps}", f"--mode={mode}", f"--ac={ac}", "--worker"]
    flags += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in OVERRIDES if getattr(args, k) is not None]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m",
           "bench.bench_scaleout", *flags]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // args.nproc))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} ac={ac} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def runs_params(results: dict) -> int:
    """The parameter count the runs report."""
    return next(run["params"] for runs in results.values() for run in runs)


def main() -> None:
    """Parse flags; run the worker (under torchrun) or the driver."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stlm-50m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--acs", default="none,full")
    p.add_argument("--mode", choices=MODES, default="ddp")
    p.add_argument("--ac", default="none")
    p.add_argument("--activations", action="store_true",
                   help="instead: saved-activation MiB and forward+backward time per --acs mode, in this process")
    p.add_argument("--collectives", action="store_true",
                   help="instead: time Gloo's collectives against geb's on one 64 MiB buffer, --nproc ranks")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in OVERRIDES:
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    args = p.parse_args()
    if args.worker and args.collectives:
        time_collectives(64)
        return
    if args.worker:
        worker(args)
        return
    if args.collectives:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m",
               "bench.bench_scaleout", "--collectives", "--worker"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        raise SystemExit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)
    if args.activations:
        torch.set_num_threads(1)
        rows = {ac: [saved_activations(args, ac) for _ in range(args.rounds)] for ac in args.acs.split(",")}
        print(f"{args.preset} batch {args.batch_size}x{args.seq_len}, 1 thread; load {os.getloadavg()[0]:.1f}")
        print("| --ac | saved activations (MiB) | loss gradients kept from the forward (MiB) | "
              "forward + backward (s, min of rounds) |\n|---|---|---|---|")
        for ac, runs in rows.items():
            print(f"| {ac} | {runs[0][0]:.0f} | {runs[0][1]:.0f} | {min(t for *_, t in runs):.2f} |")
        return
    configs = [(m, a) for m in args.modes.split(",") for a in args.acs.split(",")]
    results: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):  # interleaved: the machine is shared and drifts
        for mode, ac in configs:
            results[(mode, ac)].append(launch(args, mode, ac))
            print(json.dumps(results[(mode, ac)][-1]), flush=True)
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k)}
    print(f"\n{args.preset} {overrides} ({runs_params(results) / 1e6:.0f}M parameters) batch "
          f"{args.batch_size}x{args.seq_len} per rank, {args.nproc} ranks, {args.steps} timed steps, {args.rounds} "
          f"round(s); load {os.getloadavg()[0]:.1f}")
    print("| mode | --ac | tokens/s (median) | peak RSS / rank (MiB) | base (MiB) | state / rank (MiB) | "
          "peak - base - state (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for (mode, ac), runs in results.items():
        peak = max(r["peak_mib"] for run in runs for r in run["ranks"])
        base = max(r["base_mib"] for run in runs for r in run["ranks"])
        state = max(r["state_mib"] for run in runs for r in run["ranks"])
        tps = statistics.median(run["tokens_per_s"] for run in runs)
        print(f"| {mode} | {ac} | {tps:.0f} | {peak:.0f} | {base:.0f} | {state:.0f} | {peak - base - state:.0f} |")


if __name__ == "__main__":
    main()

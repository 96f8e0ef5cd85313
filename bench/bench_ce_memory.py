"""Peak CPU memory of loss + backward: kernels.linear_cross_entropy (impl="torch", chunked) against F.cross_entropy
on the full logits, each case in its own process.

The figure is the process's peak resident memory (ru_maxrss) after the loss and its backward, minus its peak just
after the inputs (x, weight, targets) were allocated: what the loss adds, weight and x gradients included.

    python -m bench.bench_ce_memory [--tokens 4096 --d 512 --vocab 64896]
"""

import argparse
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import kernels

CASES = ("fused", "unfused")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(case: str, tokens: int, d: int, vocab: int) -> tuple[float, float, float]:
    """(MiB added at peak, loss, seconds) of one loss + backward in this process."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d, requires_grad=True)
    w = (torch.randn(vocab, d) / d**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    base = _peak_mib()
    start = time.perf_counter()
    if case == "fused":
        loss = kernels.linear_cross_entropy(x, w, targets, impl="torch")
    else:
        loss = F.cross_entropy(F.linear(x, w).float(), targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return _peak_mib() - base, loss.item(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=64896)
    parser.add_argument("--case", choices=CASES, help="measure one case in this process (used by the parent)")
    args = parser.parse_args()
    if args.case:
        print(*measure(args.case, args.tokens, args.d, args.vocab))
        return
    print(f"{args.tokens} tokens, d {args.d}, vocab {args.vocab}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| loss | peak memory added (MiB) | loss value | seconds |")
    print("|---|---:|---:|---:|")
    results = {}
    for case in CASES:
        cmd = [sys.executable, "-m", "bench.bench_ce_memory", "--case", case, "--tokens", str(args.tokens),
               "--d", str(args.d), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        mib, loss, seconds = map(float, out)
        results[case] = mib
        name = "kernels.linear_cross_entropy, impl=torch" if case == "fused" else "F.linear + F.cross_entropy"
        print(f"| {name} | {mib:,.0f} | {loss:.5f} | {seconds:.1f} |")
    print(f"\nfused / unfused peak: {results['fused'] / results['unfused']:.3f}")


if __name__ == "__main__":
    main()

"""Data loader benchmarks: tokens/s from one process, and peak memory when streaming a large shard set.

    pytest bench/bench_data.py -s                         # default: 128 MB shard set, prints the figures
    GEB_BENCH_STREAM_GB=4 pytest bench/bench_data.py -s   # the multi-GB case (writes 4 GB under /tmp)

The loader must feed at least 20x the fastest training throughput measured on this machine; the floor asserted here
(LOADER_FLOOR tokens/s) is far above what a CPU training step consumes.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from geb.data import write_token_dir
from geb.loader import TokenLoader, iter_eval_windows
from geb.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "corpus"
LOADER_FLOOR = 1_000_000  # tokens/s: 20x a CPU training run at 50k tokens/s
SHARD_TOKENS = 64 << 20  # 128 MB uint16 shards in the streaming case


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small tokenizer: the shards hold random ids, so only its file (hash, special ids) matters."""
    return train_tokenizer([CORPUS / "macbeth_act1.txt"], tmp_path_factory.mktemp("tok") / "t", 300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_file) -> Path:
    d = tmp_path_factory.mktemp("bench-data")
    rng = np.random.default_rng(0)
    shards = (rng.integers(0, 8192, 4 << 20, dtype=np.uint16) for _ in range(4))  # 16M tokens, 4 shards
    val = [rng.integers(0, 8192, 1 << 20, dtype=np.uint16)]
    write_token_dir(d, tokenizer_file, {"train": shards, "val": val}, vocab_size=8192)
    return d


def _rate(fn, batch_tokens: int, rounds: int = 7, seconds: float = 0.2) -> float:
    """Median tokens/s over short rounds: robust to other processes sharing the 2 cores."""
    rates = []
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        rates.append(n * batch_tokens / (time.perf_counter() - t0))
    return float(np.median(rates))


@pytest.mark.parametrize("seq_len, batch_size", [(256, 32), (2048, 8)])
def test_loader_throughput(benchmark, data_dir, seq_len, batch_size):
    loader = TokenLoader(data_dir, "train", seq_len, batch_size, seed=0)
    next(loader)  # maps the shards, builds the epoch permutation
    rate = _rate(lambda: next(loader), seq_len * batch_size)
    benchmark.extra_info["tokens_per_s"] = round(rate)
    benchmark.pedantic(next, args=(loader,), rounds=200, iterations=1)
    print(f"\nTokenLoader seq_len={seq_len} batch={batch_size}: {rate / 1e6:.1f}M tokens/s (one process)")
    assert rate >= LOADER_FLOOR


def test_eval_windows_throughput(benchmark, data_dir):
    def one_pass():
        return sum(int((y != -100).sum()) for _, y in iter_eval_windows(data_dir, "val", 1024, 16))

    t0 = time.perf_counter()
    n = one_pass()
    rate = n / (time.perf_counter() - t0)
    benchmark.extra_info["tokens_per_s"] = round(rate)
    benchmark.pedantic(one_pass, rounds=1, iterations=1)
    print(f"\niter_eval_windows seq_len=1024 batch=16: {rate / 1e6:.1f}M tokens/s")
    assert n == 1 << 20


_STREAM = r"""
import json, resource, sys, time
from geb.loader import TokenLoader

def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "RssAnon", "VmHWM"))}

base = status()
loader = TokenLoader(sys.argv[1], "train", 2048, 32, seed=0)
peak_anon, t0, n = 0, time.perf_counter(), 0
for step in range(loader.steps_per_epoch):  # one full shuffled epoch over every shard
    x, y = next(loader)
    n += x.numel()
    if step % 16 == 0:
        peak_anon = max(peak_anon, status()["RssAnon"])
dt = time.perf_counter() - t0
end = status()
print(json.dumps({"tokens": n, "seconds": dt, "base_anon": base["RssAnon"], "peak_anon": peak_anon,
                  "peak_rss": end["VmHWM"], "base_rss": base["VmRSS"], "open_maps": len(loader._shards._open)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_stream_peak_memory(tmp_path, tokenizer_file):
    gb = float(os.environ.get("GEB_BENCH_STREAM_GB", "0.125"))
    total = int(gb * (1 << 30)) // 2  # uint16 tokens
    sizes = [SHARD_TOKENS] * (total // SHARD_TOKENS) + ([total % SHARD_TOKENS] if total % SHARD_TOKENS else [])

    def shards():
        rng = np.random.default_rng(0)
        for n in sizes:  # one shard in memory at a time
            yield rng.integers(0, 8192, n, dtype=np.uint16)

    write_token_dir(tmp_path, tokenizer_file, {"train": shards()}, vocab_size=8192)
    r = subprocess.run([sys.executable, "-c", _STREAM, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    print(f"\nstreamed {res['tokens'] / 1e6:.0f}M tokens ({gb:g} GB on disk, {len(sizes)} shards) in "
          f"{res['seconds']:.1f}s = {res['tokens'] / res['seconds'] / 1e6:.1f}M tokens/s; anonymous memory "
          f"{res['base_anon'] / mib:.0f} -> peak {res['peak_anon'] / mib:.0f} MiB; peak RSS incl. mapped file pages "
          f"{res['peak_rss'] / mib:.0f} MiB (page cache, reclaimable)")
    # What the loader itself allocates must not scale with the data: no shard is ever copied into memory.
    assert res["peak_anon"] - res["base_anon"] < 64 * mib

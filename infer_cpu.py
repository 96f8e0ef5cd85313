"""Generate text on a CPU from a geb checkpoint: static KV cache, optional torch.compile and int8 or
4-bit quantization.

    python infer_cpu.py --prompt "Once upon a time"            # latest checkpoint of out/tiny
    python infer_cpu.py --ckpt out/tiny/ckpt-0001000.pt --prompt "..." --quant int4 --compile
    python infer_cpu.py --bench --quant int8 --compile          # random geb-1.3b weights, one JSON line
    python infer_cpu.py --ckpt out/sft --chat --system "..."    # multi-turn chat (geb-chat-v1 template)
    python infer_cpu.py --ckpt out/sft --chat --prompt "..."    # one user turn, answered

The continuation streams to stdout; a stats line goes to stderr. Training documents are followed by EOS, so the
prompt is preceded by EOS (the tokenizer's BOS if it has no EOS): an empty prompt samples a document from scratch.
Generation stops at EOS, after --max-new-tokens, or at the model's context limit. Ctrl-C stops early (exit 0).
With --chat the prompt is a user turn in the chat template (no EOS before it); the KV cache keeps the earlier turns,
so each turn prefills only its own tokens. In the loop, one line is one user turn; an empty line or EOF ends it.
"""

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from geb.chat import encode_prompt as encode_chat_prompt
from geb.checkpoint import CheckpointError, list_checkpoints, load_model
from geb.config import PRESETS, preset
from geb.cpu_linear import QUANTS, convert_for_cpu, int8_method, move_to_huge_pages
from geb.generate import Decoder, GenerationStats, fit_prompt
from geb.model import GEB
from geb.tokenizer import Tokenizer
from geb.weights_cache import checkpoint_file, load_cached, save_cached

DEFAULT_RUN = "out/tiny"
TRAIN_HINT = "torchrun --standalone --nproc_per_node=2 train.py` (or `python train.py`)"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_model(preset_name: str, seed: int = 0) -> GEB:
    """A random-init GEB of a preset, built on the meta device then filled once (no second copy, no slow init)."""
    config = preset(preset_name, dropout=0.0)
    with torch.device("meta"):
        model = GEB(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty allocates each module's parameters separately
        model.lm_head.weight = model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                # Uniform with std 0.02 is much faster to draw than normal_ and just as good for timing.
                p.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=gen)
    return model.eval()


def make_decoder(model: GEB, quant: str, compile: bool, cache_len: int,
                 compile_mode: str | None) -> tuple[Decoder, str, float]:
    """Fuse projections and convert the linear layers' weights (int8, or fp32 for batch-1 decoding), then build the
    Decoder (its decode step compiled lazily on first use); also the weight format used and the seconds spent."""
    t0 = time.perf_counter()
    method = convert_for_cpu(model, quant)
    quant_s = time.perf_counter() - t0
    return Decoder(model, max_seq_len=cache_len, compile=compile, compile_mode=compile_mode), method, quant_s


def run_bench(args: argparse.Namespace) -> None:
    """Random-init model from --preset: time load, compile, prefill and decode; one JSON line on stdout."""
    loadavg = os.getloadavg()[0]  # other processes on the box distort the figures: report how busy it was
    t0 = time.perf_counter()
    model = random_model(args.preset, args.seed or 0)
    new_tokens = args.max_new_tokens or 64
    prompt = torch.randint(0, model.config.vocab_size, (args.bench_prompt_tokens,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    cache_len = min(model.config.max_seq_len, len(prompt) + new_tokens)
    load_s = time.perf_counter() - t0
    decoder, method, quant_s = make_decoder(model, args.quant, args.compile, cache_len, args.compile_mode)
    if args.huge_pages:
        move_to_huge_pages(model)
    stats = GenerationStats()
    compile_s = decoder.warmup()  # eager warmup too, so first-call allocations do not count as decode time
    for _ in decoder.generate(prompt, new_tokens, temperature=0.0, stats=stats):
        pass
    print(json.dumps({
        "preset": args.preset, "quant": args.quant, "quant_method": method, "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None, "threads": torch.get_num_threads(),
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
        "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 3), "peak_rss_mb": round(peak_rss_mb()),
        "load_s": round(load_s, 2), "quant_s": round(quant_s, 2),
        "compile_s": round(compile_s if args.compile else 0.0, 2),
        "torch": torch.__version__, "loadavg_1m_before": round(loadavg, 2),
    }), flush=True)


def load_converted(source: Path, quant: str, use_cache: bool) -> tuple[GEB, Path | None, str]:
    """The model of source with its linear layers converted for --quant, and its tokenizer path: from the start-up
    cache (geb.weights_cache) when it holds this checkpoint, else loaded, converted and cached; also where it came
    from ("cache", "converted, cached" or "converted")."""
    # FBGEMM's packed weights (--quant int8 without geb's AVX-512 VNNI kernel) cannot be saved: converted each start.
    cacheable = use_cache and (quant != "int8" or int8_method() == "geb")
    ckpt = checkpoint_file(source) if cacheable else None
    if ckpt is not None and (cached := load_cached(ckpt, quant)) is not None:
        model, tokenizer_path = cached
        return model, tokenizer_path, "cache"
    model, tokenizer_path = load_model(source)
    convert_for_cpu(model, quant)
    if ckpt is None:
        return model, tokenizer_path, "converted"
    try:
        save_cached(ckpt, quant, model, tokenizer_path)
        origin = "converted, cached"
    except OSError as e:  # a full or read-only cache dir costs the next start time, not this one its output
        print(f"warning: could not cache the converted weights ({e})", file=sys.stderr)
        origin = "converted"
    return model, tokenizer_path, origin


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[GEB, Tokenizer, str]:
    """Model (linear layers converted for --quant) and tokenizer of --ckpt (default: the latest checkpoint of
    out/tiny), and where the weights came from; user errors exit with one line."""
    source = Path(args.ckpt or DEFAULT_RUN)
    if args.ckpt is None and not list_checkpoints(source):
        sys.exit(f"error: no checkpoint in {source}/; train one with `{TRAIN_HINT}, or pass --ckpt PATH")
    try:
        model, tokenizer_path, origin = load_converted(source, args.quant, not args.no_cache)
    except CheckpointError as e:
        hint = f"; train one with `{TRAIN_HINT}" if source.is_dir() and not list_checkpoints(source) else ""
        sys.exit(f"error: --ckpt {e}{hint}")
    if tokenizer_path is None:
        where = source if source.is_dir() else source.parent
        sys.exit(f"error: --ckpt {source}: no tokenizer.model found (looked in {where}/ and the checkpoint's "
                 "data_dir); copy the tokenizer the model was trained with there")
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if tokenizer.vocab_size > model.config.vocab_size:
        sys.exit(f"error: {tokenizer_path} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                 f"{model.config.vocab_size}: not the tokenizer this checkpoint was trained with")
    if args.huge_pages:
        move_to_huge_pages(model)
    return model, tokenizer, origin


def encode_prompt(tokenizer: Tokenizer, text: str, context: int, max_new_tokens: int) -> list[int]:
    """EOS (or BOS) then text's tokens, cut to fit the context; exits with one line if that leaves nothing."""
    start = tokenizer.eos_id if tokenizer.eos_id >= 0 else tokenizer.bos_id
    prompt = fit_prompt(([start] if start >= 0 else []) + tokenizer.encode(text), context, max_new_tokens)
    if not prompt:
        sys.exit("error: --prompt is empty and the tokenizer has neither EOS nor BOS to start from")
    return prompt


def stream_continuation(decoder: Decoder, tokenizer: Tokenizer, prompt: list[int], args: argparse.Namespace,
                        stats: GenerationStats, start_pos: int = 0, tokens: list[int] | None = None
                        ) -> tuple[bool, float]:
    """Write the continuation of prompt (after start_pos cached tokens) to stdout as it is decoded, appending its
    ids to tokens; whether Ctrl-C stopped it, and the perf_counter time its first text was printed (nan if none)."""
    text_decoder = tokenizer.stream_decoder()
    for t in prompt:  # prime the decoder so the continuation's first piece decodes in context (leading spaces)
        text_decoder.push(t)
    text_decoder.flush()
    temperature = 0.0 if args.greedy else args.temperature
    interrupted, first_s = False, float("nan")
    try:
        for token in decoder.generate(prompt, args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                                      top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id, stats=stats,
                                      vocab_size=tokenizer.vocab_size, start_pos=start_pos):
            if tokens is not None:
                tokens.append(token)
            text = text_decoder.push(token)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
                if first_s != first_s:
                    first_s = time.perf_counter()
    except KeyboardInterrupt:
        interrupted = True
    sys.stdout.write(text_decoder.flush() + "\n")
    sys.stdout.flush()
    return interrupted, first_s


def run_prompt(args: argparse.Namespace) -> None:
    """Stream the continuation of --prompt to stdout, stats to stderr."""
    t0 = time.perf_counter()
    model, tokenizer, origin = load_model_and_tokenizer(args)
    prompt = encode_prompt(tokenizer, args.prompt, model.config.max_seq_len, args.max_new_tokens)
    cache_len = min(model.config.max_seq_len, len(prompt) + args.max_new_tokens)
    # The decode step compiles after the first token is printed (the prompt goes through the eager model).
    decoder = Decoder(model, max_seq_len=cache_len, compile=args.compile, compile_mode=args.compile_mode)
    load_s = time.perf_counter() - t0  # checkpoint (or cache), tokenizer and weight conversion
    stats = GenerationStats()
    interrupted, first_s = stream_continuation(decoder, tokenizer, prompt, args, stats)
    stop = "interrupted" if interrupted else stats.stop_reason
    print(f"[prompt {stats.prompt_tokens} tokens | prefill {stats.prefill_tokens_per_s:.1f} tok/s | "
          f"decode {stats.decode_tokens_per_s:.2f} tok/s ({stats.new_tokens} tokens, stop: {stop}) | "
          f"peak RSS {peak_rss_mb():.0f} MB | load {load_s:.2f} s ({origin}) | first token {first_s - t0:.2f} s | "
          f"compile {stats.compile_s:.2f} s]", file=sys.stderr)


def chat_turns(args: argparse.Namespace) -> Iterator[str]:
    """The user turns: --prompt alone, or one line of stdin per turn until an empty line or EOF."""
    if args.prompt:
        yield args.prompt
        return
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")


def run_chat(args: argparse.Namespace) -> None:
    """Answer user turns in the chat template (--system first), each streamed to stdout, stats to stderr; the KV
    cache keeps the conversation, so a turn prefills only its new tokens (and the previous answer's closing EOS)."""
    model, tokenizer, _ = load_model_and_tokenizer(args)
    decoder = Decoder(model, compile=args.compile, compile_mode=args.compile_mode)
    system = [{"role": "system", "content": args.system}] if args.system else []
    cached, pending = 0, []  # tokens in the cache, and tokens of the conversation not yet fed to it
    for user in chat_turns(args):
        new = pending + encode_chat_prompt((system if cached == 0 else []) + [{"role": "user", "content": user}],
                                           tokenizer)
        if cached + len(new) + 1 >= decoder.max_seq_len:
            print(f"[the conversation fills the context of {decoder.max_seq_len} tokens: starting a new one]",
                  file=sys.stderr)
            cached, new = 0, encode_chat_prompt(system + [{"role": "user", "content": user}], tokenizer)
            new = fit_prompt(new, decoder.max_seq_len, args.max_new_tokens)
        stats, answer = GenerationStats(), []
        interrupted, _ = stream_continuation(decoder, tokenizer, new, args, stats, start_pos=cached, tokens=answer)
        # the answer's last token (and the EOS closing the turn, as the template has it) are not in the cache yet
        pending = (new + answer)[decoder.pos - cached:] + [tokenizer.eos_id]
        cached = decoder.pos
        print(f"[turn {stats.prompt_tokens} new tokens, {cached} cached | prefill {stats.prefill_tokens_per_s:.1f} "
              f"tok/s | decode {stats.decode_tokens_per_s:.2f} tok/s ({stats.new_tokens} tokens, stop: "
              f"{'interrupted' if interrupted else stats.stop_reason})]", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with one line naming its flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="text to continue (default: empty = start a new document)")
    p.add_argument("--chat", action="store_true",
                   help="chat template: answer --prompt as one user turn, or each stdin line in a multi-turn loop")
    p.add_argument("--system", default="", help="with --chat: a system message before the first user turn")
    p.add_argument("--ckpt", default=None,
                   help=f"run dir (latest ckpt-*.pt), checkpoint file or HF Llama dir (default: {DEFAULT_RUN})")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 256; --bench 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--quant", choices=QUANTS, default="none",
                   help="weights of every linear layer: none = fp32 (geb AVX-512 or AVX2 kernel), int8 = int8 "
                   "with a scale per row (geb's AVX-512 VNNI kernel, else FBGEMM), q8_0 = Q8_0 and int4 = Q4_0 (geb "
                   "AVX-512 VNNI or AVX2 kernels)")
    p.add_argument("--huge-pages", action="store_true",
                   help="copy the int8 / q8_0 / int4 weights into transparent huge pages (Linux): ~1 s a GB more "
                   "start-up, faster decode where TLB misses slow the weights' streaming (int8; see BENCHMARKS.md)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles once)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither use nor write the converted weights in geb's cache dir (GEB_CACHE)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--bench", action="store_true", help="time a random-init --preset model; print one JSON line")
    p.add_argument("--preset", default="geb-1.3b", help="model preset for --bench (default geb-1.3b)")
    p.add_argument("--bench-prompt-tokens", type=int, default=16, help="prompt length for --bench")
    args = p.parse_args(argv)
    for flag in ("max_new_tokens", "threads", "bench_prompt_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.system and not args.chat:
        p.error("--system needs --chat")
    if args.huge_pages and args.quant == "none":
        p.error("--huge-pages needs --quant int8, q8_0 or int4 (fp32 weights stay as they are)")
    if args.chat and args.bench:
        p.error("--chat and --bench are exclusive")
    if args.bench:
        if args.preset not in PRESETS:
            p.error(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    elif args.max_new_tokens is None:
        args.max_new_tokens = 256
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, then --bench or stream the continuation of --prompt."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        with torch.no_grad():
            run_bench(args) if args.bench else run_chat(args) if args.chat else run_prompt(args)
    except KeyboardInterrupt:  # outside the token loop (loading, compiling): stop quietly
        print(file=sys.stderr)
    except BrokenPipeError:  # `| head`: the reader is gone
        sys.stderr.close()


if __name__ == "__main__":
    main()

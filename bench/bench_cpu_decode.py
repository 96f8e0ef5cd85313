"""CPU decode, prompts and start-up, side by side on the same weights: geb (fp32 as trained, then as infer_cpu.py
runs it: q/k/v and gate/up fused, fp32 on geb's kernel, int8, or Q4_0 on geb's integer kernel), Hugging Face
transformers (fp32 / quantize_dynamic int8; decode only) and llama.cpp (llama-cpp-python, F32 / Q8_0 / Q4_0 GGUF of
the same weights; n_batch = the longest prompt, so a prompt is one batch). Engines that are not installed are
skipped. Batch 1, greedy.

The host's memory bandwidth drifts by ±20% from minute to minute, so the engines of one precision are loaded
together and take turns (GEB_BENCH_ROUNDS rounds: each engine decodes once and prefills each prompt length once a
round); each row is the median over the rounds, with every round and the load average printed beside it.

    pytest bench/bench_cpu_decode.py -s                                  # tiny preset, eager, seconds
    GEB_BENCH_COMPILE=1 pytest bench/bench_cpu_decode.py -s              # geb's rows compiled (minutes to compile)
    GEB_BENCH_PRESET=geb-1.3b GEB_BENCH_TOKENS=32 GEB_BENCH_COMPILE=1 GEB_BENCH_ROUNDS=5 GEB_BENCH_HF=0 \
        pytest bench/bench_cpu_decode.py -s                              # ~25 min

GEB_BENCH_QUANTS picks precisions (default fp32,int8,int4); GEB_BENCH_INT8 geb's int8 engines (default
int8,fbgemm: what --quant int8 runs here and FBGEMM's; q8_0 adds geb's Q8_0 kernel); GEB_BENCH_HUGE_PAGES=1 moves
geb's quantized weights into huge pages (as infer_cpu.py --huge-pages); GEB_BENCH_PREFILL the prompt
lengths (default 16,128,512, those that fit the preset's context). test_cpu_startup times `python infer_cpu.py` to its
first printed token, cold (empty geb cache) and warm, beside `import torch` alone and llama.cpp loading the GGUF of
the same weights.
The geb-1.3b run needs ~19 GB of memory (three fp32 copies, one per engine) and ~13 GB of temporary disk.
For geb alone, `python infer_cpu.py --bench [--quant int8|int4] [--compile]` prints the same figures as one JSON line.
"""

import gc
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import infer_cpu
from geb.checkpoint import save_checkpoint
from geb.cpu_linear import move_to_huge_pages, quantize_int8, use_q4_kernel
from geb.files import file_sha256
from geb.generate import Decoder, GenerationStats
from geb.gguf import export_gguf
from geb.hf import export_hf, load_hf
from geb.tokenizer import train_tokenizer

PRESET = os.environ.get("GEB_BENCH_PRESET", "tiny")
TOKENS = int(os.environ.get("GEB_BENCH_TOKENS", "32"))
COMPILE = os.environ.get("GEB_BENCH_COMPILE") == "1"
ROUNDS = int(os.environ.get("GEB_BENCH_ROUNDS", "3"))
QUANTS = os.environ.get("GEB_BENCH_QUANTS", "fp32,int8,int4").split(",")
PREFILL = [int(n) for n in os.environ.get("GEB_BENCH_PREFILL", "16,128,512").split(",")]
WITH_HF = os.environ.get("GEB_BENCH_HF", "1") == "1"
HUGE_PAGES = os.environ.get("GEB_BENCH_HUGE_PAGES") == "1"  # geb's quantized weights as infer_cpu.py --huge-pages
PROMPT_TOKENS = 16
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
GEB_QUANT = {"fp32": "none", "int8": "int8", "int4": "int4"}
# geb's engines per precision: int8 is geb's per-channel int8, FBGEMM's, and Q8_0 on geb's kernels (GEB_BENCH_INT8).
GEB_QUANTS = {"fp32": ["none"], "int8": os.environ.get("GEB_BENCH_INT8", "int8,fbgemm").split(","), "int4": ["int4"]}

Decode = Callable[[], tuple[float, list[int]]]  # one greedy decode of the prompt: (decode tokens/s, new tokens)
Prefill = Callable[[list[int]], float]  # one prompt evaluated from an empty cache: tokens/s


def geb_engine(decoder: Decoder, prompt: list[int], n: int) -> tuple[Decode, Prefill]:
    """geb's Decoder (warmed up, and compiled if it compiles, here: compile time is not counted)."""
    decoder.warmup()

    def decode():
        stats = GenerationStats()
        tokens = list(decoder.generate(prompt, n, temperature=0.0, stats=stats))
        return stats.decode_tokens_per_s, tokens

    def prefill(ids):
        stats = GenerationStats()
        list(decoder.generate(ids, 1, temperature=0.0, stats=stats))  # the first token comes from the prefill
        return stats.prefill_tokens_per_s
    return decode, prefill


def hf_engine(hf_model, prompt: list[int], n: int) -> tuple[Decode, None]:
    """transformers' generate: (n - 1) tokens over the time after the prefill (timed apart)."""
    idx = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf_model.generate(idx, max_new_tokens=2, min_new_tokens=2, **kw)  # warm up

    def decode():
        t0 = time.perf_counter()
        hf_model.generate(idx, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf_model.generate(idx, max_new_tokens=n, min_new_tokens=n, **kw)
        return (n - 1) / max(time.perf_counter() - t0 - prefill, 1e-9), out[0, len(prompt):].tolist()
    return decode, None


def llama_cpp_engine(path, prompt: list[int], n: int, threads: int, longest: int) -> tuple[Decode, Prefill]:
    """llama-cpp-python on a GGUF file: greedy, timed after the prompt is evaluated; prompts in one batch."""
    import llama_cpp

    batch = max(longest, len(prompt))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=batch + n + 8, n_batch=batch, n_ubatch=batch,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def decode():
        llm.reset()
        llm.eval(prompt)
        tokens, t0 = [], time.perf_counter()
        for _ in range(n):
            tokens.append(int(llm.sample(top_k=1, temp=0.0)))
            llm.eval([tokens[-1]])
        return n / (time.perf_counter() - t0), tokens  # n single-token evals (the last one's logits unused)

    def prefill(ids):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)
    return decode, prefill


def race(engines: dict[tuple[str, str], tuple[Decode, Prefill | None]], prompts: list[list[int]],
         rounds: int) -> dict[tuple[str, str], dict]:
    """Each engine decodes once and prefills each prompt once per round, in turn; per engine its decode speeds,
    tokens of its last decode and prefill speeds per prompt length, every round."""
    out = {key: {"decode": [], "tokens": [], "prefill": {len(p): [] for p in prompts}} for key in engines}
    for r in range(rounds):
        load = os.getloadavg()[0]
        for key, (decode, prefill) in engines.items():
            speed, tokens = decode()
            out[key]["decode"].append(speed)
            out[key]["tokens"] = tokens
            line = f"  round {r} (load {load:.2f}): {key[0]} {key[1]}: decode {speed:.2f} tok/s"
            for ids in prompts if prefill is not None else []:
                out[key]["prefill"][len(ids)].append(prefill(ids))
                line += f", prefill {len(ids)}: {out[key]['prefill'][len(ids)][-1]:.1f} tok/s"
            print(line, flush=True)
        out_load = os.getloadavg()[0]
        for key in engines:
            out[key].setdefault("load", []).append((load, out_load))
    return out


def optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        return None


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def print_tables(rows: dict, prompt_lengths: list[int], threads: int) -> None:
    """Decode and prefill medians, and every round's figure, as markdown."""
    print(f"\nCPU decode and prefill, preset {PRESET}, batch 1, decode after a {PROMPT_TOKENS}-token prompt, {TOKENS} "
          f"new tokens, {threads} threads, median of {ROUNDS} interleaved rounds, torch {torch.__version__}")
    head = " | ".join(f"prefill {n} tok/s" for n in prompt_lengths)
    print(f"| engine | weights | decode tok/s | {head} | load (1 min) |\n|---|---|---|" + "---|" * len(prompt_lengths)
          + "---|")
    for (engine, weights), r in rows.items():
        pre = " | ".join(f"{median(r['prefill'].get(n, [])):.1f}" for n in prompt_lengths)
        loads = [x for pair in r["load"] for x in pair]
        print(f"| {engine} | {weights} | {median(r['decode']):.2f} | {pre} | {min(loads):.1f}-{max(loads):.1f} |")
    print("\nEvery round (decode tok/s; prefill tok/s by prompt length):")
    for (engine, weights), r in rows.items():
        pre = "; ".join(f"{n}: " + " / ".join(f"{x:.1f}" for x in r["prefill"].get(n, [])) for n in prompt_lengths
                        if r["prefill"].get(n))
        print(f"- {engine} {weights}: decode " + " / ".join(f"{x:.2f}" for x in r["decode"]) + (f"; {pre}" if pre
                                                                                                    else ""))


def geb_label(fmt: str) -> str:
    isa = {"avx2": "AVX2", "vnni": "AVX-512 VNNI"}.get(use_q4_kernel(), "?") if fmt in ("gemv", "q4_0", "q8_0", "geb") \
        else ""
    labels = {"gemv": f"fp32 (fused, geb {isa.removesuffix(' VNNI')} kernel)", "onednn": "fp32 (fused, oneDNN-packed)",
              "plain": "fp32 (fused, MKL)", "q4_0": f"int4 (fused, Q4_0, geb {isa} kernel)",
              "q8_0": f"int8 (fused, Q8_0, geb {isa} kernel)", "geb": f"int8 (fused, per-channel, geb {isa} kernel)",
              "fbgemm": "int8 (fused, FBGEMM per-channel)"}
    return labels.get(fmt, f"int8 (fused, {fmt})")


@pytest.mark.slow
def test_cpu_decode_side_by_side(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = infer_cpu.random_model(PRESET)
    context = model.config.max_seq_len
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,)).tolist()
    lengths = [n for n in PREFILL if n + 1 <= context]
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in lengths]
    cache_len = max([PROMPT_TOKENS + TOKENS, *(n + 1 for n in lengths)])
    transformers = optional("transformers") if WITH_HF else None
    llama_cpp = optional("llama_cpp")
    geb_kind = "geb compiled" if COMPILE else "geb eager"
    rows = {}
    with torch.no_grad():
        ref = None
        if "fp32" in QUANTS:  # the reference continuation: every fp32 engine must give it
            plain = geb_engine(Decoder(model, max_seq_len=PROMPT_TOKENS + TOKENS), prompt, TOKENS)
            rows.update(race({("geb eager", "fp32 (as trained: MKL)"): (plain[0], None)}, [], 1))
            ref = rows[("geb eager", "fp32 (as trained: MKL)")]["tokens"]
            del plain
            model.clear_kv_cache()
        # The other engines' copies of the same weights, written while the fp32 model exists.
        geb_engines = sum(len(GEB_QUANTS[q]) for q in QUANTS)
        hf_dir = export_hf(model, tmp_path / "hf") if geb_engines > 1 or transformers is not None else None
        gguf = {}
        if llama_cpp is not None:
            # llama.cpp needs a vocabulary in the file
            tok = train_tokenizer(["a b c " * 1000], tmp_path / "tok", min(model.config.vocab_size, 300))
            gguf = {GGUF_TYPE[q]: export_gguf(model, tok, tmp_path / f"m-{GGUF_TYPE[q]}.gguf", GGUF_TYPE[q])
                    for q in QUANTS}

        for weights in QUANTS:
            engines, hf, decoders = {}, None, []
            for quant in GEB_QUANTS[weights]:
                if model is None:  # an earlier engine converted it: the same weights again
                    gc.collect()
                    model = load_hf(hf_dir, impl="torch").eval()
                if quant == "fbgemm":  # --quant int8 where geb's kernel does not build
                    model.fuse_projections()
                    fmt = quantize_int8(model, "fbgemm")
                    decoder = Decoder(model, max_seq_len=cache_len, compile=COMPILE)
                else:
                    decoder, fmt, _ = infer_cpu.make_decoder(model, quant, COMPILE, cache_len, None)
                huge = HUGE_PAGES and move_to_huge_pages(model) > 0
                engines[(geb_kind, geb_label(fmt) + (", huge pages" if huge else ""))] = geb_engine(decoder, prompt,
                                                                                                   TOKENS)
                decoders.append(decoder)
                model = None
            if transformers is not None and weights != "int4":
                hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
                if weights == "int8":
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
                engines[("transformers generate", "fp32" if weights == "fp32" else "int8 (quantize_dynamic)")] = \
                    hf_engine(hf, prompt, TOKENS)
            if gguf:
                qtype = GGUF_TYPE[weights]
                engines[("llama.cpp", qtype.upper())] = llama_cpp_engine(gguf[qtype], prompt, TOKENS, threads,
                                                                         max(lengths, default=0))
            results = race(engines, prompts, ROUNDS)
            rows.update(results)
            if ref is not None and weights == "fp32":  # the same weights, the same greedy continuation everywhere
                assert all(r["tokens"][:8] == ref[:8] for r in results.values())
            del engines, hf, decoders, decoder
            torch._dynamo.reset()  # compiled code holds on to the model it was compiled for
            gc.collect()

    print_tables(rows, lengths, threads)
    assert all(median(r["decode"]) > 0 for r in rows.values())


def time_to_first_byte(cmd: list[str], env: dict) -> float:
    """Seconds from starting cmd to the first byte on its stdout (the process is then stopped)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.kill()
    _, err = proc.communicate()
    assert first, f"{cmd[:3]} printed nothing: {err.decode()[-2000:]}"
    return elapsed


LLAMA_FIRST_TOKEN = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
llm.eval(llm.tokenize(b"Thunder and lightning", add_bos=False))
sys.stdout.write(llm.detokenize([int(llm.sample(top_k=1, temp=0.0))]).decode(errors="replace") or "?")
sys.stdout.flush()
"""


@pytest.mark.slow
def test_cpu_startup(tmp_path):
    """Start to first printed token: `import torch` alone, infer_cpu.py cold (empty geb cache) and warm, llama.cpp."""
    threads = torch.get_num_threads()
    model = infer_cpu.random_model(PRESET)
    tok = train_tokenizer(["a b c " * 1000], tmp_path / "tok", min(model.config.vocab_size, 300))
    run = tmp_path / "run"
    state = {"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 1,
             "tokenizer_sha256": file_sha256(tok), "data_dir": None}
    ckpt = save_checkpoint(run, 1, state)
    shutil.copyfile(tok, run / "tokenizer.model")
    ggufs = {}
    if optional("llama_cpp") is not None:
        ggufs = {q: export_gguf(model, tok, tmp_path / f"m-{GGUF_TYPE[q]}.gguf", GGUF_TYPE[q]) for q in QUANTS}
    del model, state
    gc.collect()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    rows = {"import torch": [time_to_first_byte([sys.executable, "-c", "import torch; print(1)"], env)
                             for _ in range(ROUNDS)]}
    for q in QUANTS:
        cache = tmp_path / f"cache-{q}"
        cmd = [sys.executable, str(root / "infer_cpu.py"), "--ckpt", str(ckpt), "--prompt", "Thunder and lightning",
               "--greedy", "--max-new-tokens", "4", "--quant", GEB_QUANT[q], "--threads", str(threads)]
        for _ in range(ROUNDS):
            shutil.rmtree(cache, ignore_errors=True)
            cold_env = {**env, "GEB_CACHE": str(cache)}
            rows.setdefault(f"geb {q} cold (no cache)", []).append(time_to_first_byte(cmd, cold_env))
            rows.setdefault(f"geb {q} warm", []).append(time_to_first_byte(cmd, cold_env))
            if q in ggufs:
                rows.setdefault(f"llama.cpp {GGUF_TYPE[q].upper()}", []).append(time_to_first_byte(
                    [sys.executable, "-c", LLAMA_FIRST_TOKEN, str(ggufs[q]), str(threads)], env))
    print(f"\nStart to first printed token, preset {PRESET} (checkpoint {ckpt.stat().st_size / 2**30:.2f} GiB, model "
          f"only), {threads} threads, median of {ROUNDS} rounds, load {os.getloadavg()[0]:.2f}, files in the OS page "
          "cache (cold = no geb cache)")
    print("| what | seconds (median) | rounds |\n|---|---|---|")
    for what, xs in rows.items():
        print(f"| {what} | {median(xs):.2f} | " + " / ".join(f"{x:.2f}" for x in xs) + " |")

"""CPU decode, side by side on the same weights: geb (fp32 as trained, then as infer_cpu.py runs it: q/k/v and
gate/up fused, fp32 on geb's AVX2 kernel or int8), Hugging Face transformers (fp32 / quantize_dynamic int8) and
llama.cpp (llama-cpp-python, F32 / Q8_0 GGUF). Engines that are not installed are skipped. Batch 1, greedy.

The host's memory bandwidth drifts by ±20% from minute to minute, so the engines of one precision are loaded
together and decode in turns (GEB_BENCH_ROUNDS rounds, each engine once a round); each row is its best round.

    pytest bench/bench_cpu_decode.py -s                                  # tiny preset, eager, seconds
    GEB_BENCH_COMPILE=1 pytest bench/bench_cpu_decode.py -s              # geb's rows compiled (minutes to compile)
    GEB_BENCH_PRESET=geb-1.3b GEB_BENCH_TOKENS=64 GEB_BENCH_COMPILE=1 pytest bench/bench_cpu_decode.py -s  # ~15 min

The geb-1.3b run needs ~19 GB of memory (three fp32 copies, one per engine) and ~7 GB of temporary disk.
For geb alone, `python infer_cpu.py --bench [--quant int8] [--compile]` prints the same figures as one JSON line.
"""

import gc
import os
import time
import warnings
from collections.abc import Callable

import pytest
import torch

import infer_cpu
from geb.generate import Decoder, GenerationStats
from geb.gguf import export_gguf
from geb.hf import export_hf, load_hf
from geb.tokenizer import train_tokenizer

PRESET = os.environ.get("GEB_BENCH_PRESET", "tiny")
TOKENS = int(os.environ.get("GEB_BENCH_TOKENS", "32"))
COMPILE = os.environ.get("GEB_BENCH_COMPILE") == "1"
ROUNDS = int(os.environ.get("GEB_BENCH_ROUNDS", "3"))
PROMPT_TOKENS = 16

Decode = Callable[[], tuple[float, list[int]]]  # one greedy decode of the prompt: (decode tokens/s, new tokens)


def geb_engine(decoder: Decoder, prompt: list[int], n: int) -> Decode:
    """geb's Decoder (warmed up, and compiled if it compiles, here: compile time is not counted)."""
    decoder.warmup()

    def decode():
        stats = GenerationStats()
        tokens = list(decoder.generate(prompt, n, temperature=0.0, stats=stats))
        return stats.decode_tokens_per_s, tokens
    return decode


def hf_engine(hf_model, prompt: list[int], n: int) -> Decode:
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
    return decode


def llama_cpp_engine(path, prompt: list[int], n: int, threads: int) -> Decode:
    """llama-cpp-python on a GGUF file: greedy, timed after the prompt is evaluated."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, verbose=False)

    def decode():
        llm.reset()
        llm.eval(prompt)
        tokens, t0 = [], time.perf_counter()
        for _ in range(n):
            tokens.append(int(llm.sample(top_k=1, temp=0.0)))
            llm.eval([tokens[-1]])
        return n / (time.perf_counter() - t0), tokens  # n single-token evals (the last one's logits unused)
    return decode


def race(engines: dict[tuple[str, str], Decode], rounds: int) -> dict[tuple[str, str], tuple[float, list[int]]]:
    """Each engine decodes once per round, in turn; each one's best speed and its tokens."""
    best = {key: (0.0, []) for key in engines}
    for r in range(rounds):
        for key, decode in engines.items():
            speed, tokens = decode()
            print(f"  round {r}: {key[0]} {key[1]}: {speed:.2f} tok/s", flush=True)
            best[key] = max(best[key], (speed, tokens), key=lambda pair: pair[0])
    return best


def optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        return None


@pytest.mark.slow
def test_cpu_decode_side_by_side(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = infer_cpu.random_model(PRESET)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,)).tolist()
    transformers, llama_cpp = optional("transformers"), optional("llama_cpp")
    geb_kind = "geb compiled" if COMPILE else "geb eager"
    rows = {}
    with torch.no_grad():
        plain = geb_engine(Decoder(model, max_seq_len=PROMPT_TOKENS + TOKENS), prompt, TOKENS)
        rows.update(race({("geb eager", "fp32 (as trained: MKL)"): plain}, ROUNDS))
        ref = rows[("geb eager", "fp32 (as trained: MKL)")][1]
        del plain
        model.clear_kv_cache()
        # The other engines' copies of the same weights, written while the fp32 model exists.
        hf_dir = export_hf(model, tmp_path / "hf")
        gguf = {}
        if llama_cpp is not None:
            # llama.cpp needs a vocabulary in the file
            tok = train_tokenizer(["a b c " * 1000], tmp_path / "tok", min(model.config.vocab_size, 300))
            gguf = {q: export_gguf(model, tok, tmp_path / f"m-{q}.gguf", q) for q in ("f32", "q8_0")}

        for weights in ("fp32", "int8"):
            engines, hf = {}, None
            if weights == "int8":
                del model
                gc.collect()
                model = load_hf(hf_dir, impl="torch").eval()
            decoder, fmt, _ = infer_cpu.make_decoder(model, "none" if weights == "fp32" else "int8", COMPILE,
                                                     PROMPT_TOKENS + TOKENS, None)
            label = {"gemv": "fp32 (fused, geb AVX2 kernel)", "onednn": "fp32 (fused, oneDNN-packed)",
                     "plain": "fp32 (fused, MKL)"}.get(fmt)
            label = label or f"int8 (fused, {fmt})"
            engines[(geb_kind, label)] = geb_engine(decoder, prompt, TOKENS)
            if transformers is not None:
                hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
                if weights == "int8":
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
                engines[("transformers generate", "fp32" if weights == "fp32" else "int8 (quantize_dynamic)")] = \
                    hf_engine(hf, prompt, TOKENS)
            if gguf:
                qtype = "f32" if weights == "fp32" else "q8_0"
                engines[("llama.cpp", qtype.upper())] = llama_cpp_engine(gguf[qtype], prompt, TOKENS, threads)
            results = race(engines, ROUNDS)
            rows.update(results)
            if weights == "fp32":  # the same weights give the same greedy continuation in every engine
                assert all(tokens[:8] == ref[:8] for _, tokens in results.values())
            del engines, hf, decoder
            torch._dynamo.reset()  # compiled code holds on to the model it was compiled for
            gc.collect()

    print(f"\nCPU decode, preset {PRESET}, batch 1, {PROMPT_TOKENS}-token prompt, {TOKENS} new tokens, "
          f"{threads} threads, best of {ROUNDS} interleaved rounds, torch {torch.__version__}")
    print("| engine | weights | decode tok/s |\n|---|---|---|")
    for (engine, weights), (speed, _) in rows.items():
        print(f"| {engine} | {weights} | {speed:.2f} |")
    assert all(speed > 0 for speed, _ in rows.values())

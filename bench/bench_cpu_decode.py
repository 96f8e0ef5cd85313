"""CPU decode, side by side on the same weights: geb (fp32 plain / oneDNN-packed / int8, eager and compiled),
Hugging Face transformers (fp32 / quantize_dynamic int8) and llama.cpp (llama-cpp-python, F32 / Q8_0 GGUF).
Engines that are not installed are skipped. Batch 1, greedy; each row is the best of GEB_BENCH_REPEATS decodes.

    pytest bench/bench_cpu_decode.py -s                                  # tiny preset, eager, seconds
    GEB_BENCH_COMPILE=1 pytest bench/bench_cpu_decode.py -s              # + compiled geb rows (minutes to compile)
    GEB_BENCH_PRESET=geb-1.3b GEB_BENCH_TOKENS=64 GEB_BENCH_COMPILE=1 pytest bench/bench_cpu_decode.py -s  # ~15 min

The geb-1.3b run needs ~12 GB of memory and ~7 GB of temporary disk (the HF and GGUF copies of the weights).
For geb alone, `python infer_cpu.py --bench [--quant int8] [--compile]` prints the same figures as one JSON line.
"""

import copy
import gc
import os
import time
import warnings

import pytest
import torch

import infer_cpu
from geb.generate import GenerationStats, Generator
from geb.hf import export_hf
from geb.quant import pack_fp32, quantize_int8

PRESET = os.environ.get("GEB_BENCH_PRESET", "tiny")
TOKENS = int(os.environ.get("GEB_BENCH_TOKENS", "32"))
COMPILE = os.environ.get("GEB_BENCH_COMPILE") == "1"
REPEATS = int(os.environ.get("GEB_BENCH_REPEATS", "3"))
PROMPT_TOKENS = 16


def geb_decode(model, prompt: list[int], n: int, compile: bool = False) -> tuple[float, list[int]]:
    """Best decode tokens/s of geb's Generator over REPEATS runs (compile time excluded), and the greedy tokens."""
    gen = Generator(model, max_seq_len=len(prompt) + n, compile=compile)
    gen.warmup()
    best, tokens = 0.0, []
    for _ in range(REPEATS):
        stats = GenerationStats()
        tokens = list(gen.generate(prompt, n, temperature=0.0, stats=stats))
        best = max(best, stats.decode_tokens_per_s)
    model.clear_kv_cache()
    return best, tokens


def hf_decode(hf_model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Best decode tokens/s of transformers' generate: (n - 1) tokens over the time after the prefill."""
    idx = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    best = 0.0
    with torch.no_grad():
        hf_model.generate(idx, max_new_tokens=2, min_new_tokens=2, **kw)  # warm up
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            hf_model.generate(idx, max_new_tokens=1, min_new_tokens=1, **kw)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf_model.generate(idx, max_new_tokens=n, min_new_tokens=n, **kw)
            best = max(best, (n - 1) / max(time.perf_counter() - t0 - prefill, 1e-9))
    return best, out[0, len(prompt):].tolist()


def llama_cpp_decode(path, prompt: list[int], n: int, threads: int) -> tuple[float, list[int]]:
    """Best decode tokens/s of llama-cpp-python on a GGUF file, greedy, timed after the prompt is evaluated."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, verbose=False)
    best, tokens = 0.0, []
    for _ in range(REPEATS):
        llm.reset()
        llm.eval(prompt)
        tokens, t0 = [], time.perf_counter()
        for _ in range(n):
            tok = int(llm.sample(top_k=1, temp=0.0))
            tokens.append(tok)
            llm.eval([tok])
        best = max(best, n / (time.perf_counter() - t0))  # n single-token evals (the last one's logits unused)
    del llm
    return best, tokens


@pytest.mark.slow
def test_cpu_decode_side_by_side(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = infer_cpu.random_model(PRESET)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,)).tolist()
    rows = []

    def row(engine: str, weights: str, speed: float) -> None:
        rows.append((engine, weights, speed))
        print(f"  {engine} {weights}: {speed:.2f} tok/s", flush=True)

    with torch.no_grad():
        speed, ref = geb_decode(model, prompt, TOKENS)
        row("geb eager", "fp32 (plain, MKL)", speed)

        # The other engines' copies of the same weights, written while the fp32 model exists.
        hf_dir = export_hf(model, tmp_path / "hf")
        gguf_paths = {}
        try:
            import llama_cpp  # noqa: F401

            from geb.gguf import export_gguf
            from geb.tokenizer import train_tokenizer  # llama.cpp needs a vocabulary in the file

            tok = train_tokenizer(["a b c " * 1000], tmp_path / "tok", min(model.config.vocab_size, 300))
            gguf_paths = {q: export_gguf(model, tok, tmp_path / f"m-{q}.gguf", q) for q in ("f32", "q8_0")}
        except ImportError:
            pass

        int8 = copy.deepcopy(model)
        quantize_int8(int8)
        if pack_fp32(model):  # in place: one fp32 copy at a time
            speed, tokens = geb_decode(model, prompt, TOKENS)
            row("geb eager", "fp32 (oneDNN-packed)", speed)
            assert tokens[:8] == ref[:8]
            if COMPILE:
                speed, tokens = geb_decode(model, prompt, TOKENS, compile=True)
                row("geb compiled", "fp32 (oneDNN-packed)", speed)
                assert tokens[:8] == ref[:8]
        del model
        gc.collect()
        row("geb eager", "int8 (FBGEMM)", geb_decode(int8, prompt, TOKENS)[0])
        if COMPILE:
            row("geb compiled", "int8 (FBGEMM)", geb_decode(int8, prompt, TOKENS, compile=True)[0])
        del int8
        gc.collect()

        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            speed, tokens = hf_decode(hf, prompt, TOKENS)
            row("transformers generate", "fp32", speed)
            assert tokens[:8] == ref[:8]  # the same weights give the same greedy continuation
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            row("transformers generate", "int8 (quantize_dynamic)", hf_decode(hf, prompt, TOKENS)[0])
            del hf
            gc.collect()

        for qtype, path in gguf_paths.items():
            speed, tokens = llama_cpp_decode(path, prompt, TOKENS, threads)
            row("llama.cpp", qtype.upper(), speed)
            if qtype == "f32":
                assert tokens[:8] == ref[:8]

    print(f"\nCPU decode, preset {PRESET}, batch 1, {PROMPT_TOKENS}-token prompt, {TOKENS} new tokens, "
          f"{threads} threads, best of {REPEATS}, torch {torch.__version__}")
    print("| engine | weights | decode tok/s |\n|---|---|---|")
    for engine, weights, speed in rows:
        print(f"| {engine} | {weights} | {speed:.2f} |")
    assert all(speed > 0 for _, _, speed in rows)

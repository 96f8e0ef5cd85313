"""CPU decode, side by side on the same weights: geb (eager / compiled, fp32 / int8), Hugging Face transformers
(fp32 / quantize_dynamic int8) and llama.cpp (llama-cpp-python, F32 / Q8_0 GGUF). Engines that are not installed are
skipped. Batch 1, greedy.

    pytest bench/bench_cpu_decode.py -s                                  # tiny preset, eager, seconds
    GEB_BENCH_COMPILE=1 pytest bench/bench_cpu_decode.py -s              # + compiled geb rows (minutes to compile)
    GEB_BENCH_PRESET=geb-1.3b GEB_BENCH_TOKENS=64 pytest bench/bench_cpu_decode.py -s   # the real shape, minutes

For geb alone, `python infer_cpu.py --bench [--quant int8] [--compile]` prints the same figures as one JSON line.
"""

import copy
import os
import time
import warnings

import pytest
import torch

import infer_cpu
from geb.generate import GenerationStats, Generator
from geb.hf import export_hf

PRESET = os.environ.get("GEB_BENCH_PRESET", "tiny")
TOKENS = int(os.environ.get("GEB_BENCH_TOKENS", "32"))
COMPILE = os.environ.get("GEB_BENCH_COMPILE") == "1"
PROMPT_TOKENS = 16


def geb_decode(model, prompt: list[int], n: int, compile: bool = False) -> tuple[float, list[int]]:
    """Decode tokens/s and the greedy tokens of geb's Generator (compile time excluded)."""
    gen = Generator(model, max_seq_len=len(prompt) + n, compile=compile)
    gen.warmup()
    stats = GenerationStats()
    tokens = list(gen.generate(prompt, n, temperature=0.0, stats=stats))
    model.clear_kv_cache()
    return stats.decode_tokens_per_s, tokens


def hf_decode(hf_model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Decode tokens/s of transformers' generate: (n - 1) tokens over the time after the prefill."""
    idx = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf_model.generate(idx, max_new_tokens=2, min_new_tokens=2, **kw)  # warm up
        t0 = time.perf_counter()
        hf_model.generate(idx, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf_model.generate(idx, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - t0
    return (n - 1) / max(total - prefill, 1e-9), out[0, len(prompt):].tolist()


def llama_cpp_decode(path, prompt: list[int], n: int, threads: int) -> tuple[float, list[int]]:
    """Decode tokens/s of llama-cpp-python on a GGUF file, greedy, timed after the prompt is evaluated."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, verbose=False)
    llm.eval(prompt)
    tokens, t0 = [], time.perf_counter()
    for _ in range(n):
        tok = int(llm.sample(top_k=1, temp=0.0))
        tokens.append(tok)
        llm.eval([tok])
    return (n - 1) / (time.perf_counter() - t0), tokens


@pytest.mark.slow
def test_cpu_decode_side_by_side(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = infer_cpu.random_model(PRESET)
    prompt = torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,)).tolist()
    rows = []
    with torch.no_grad():
        speed, ref = geb_decode(model, prompt, TOKENS)
        rows.append(("geb eager", "fp32", speed))
        if COMPILE:
            speed, tokens = geb_decode(model, prompt, TOKENS, compile=True)
            rows.append(("geb compiled", "fp32", speed))
            assert tokens == ref
        from geb.quant import quantize_int8

        q = copy.deepcopy(model)
        quantize_int8(q)
        rows.append(("geb eager", "int8 (FBGEMM)", geb_decode(q, prompt, TOKENS)[0]))
        if COMPILE:
            rows.append(("geb compiled", "int8 (FBGEMM)", geb_decode(q, prompt, TOKENS, compile=True)[0]))
        del q

        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            hf_dir = export_hf(model, tmp_path / "hf")
            hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            speed, tokens = hf_decode(hf, prompt, TOKENS)
            rows.append(("transformers generate", "fp32", speed))
            assert tokens[:8] == ref[:8]  # the same weights give the same greedy continuation
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.ao.quantization.quantize_dynamic(hf, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            rows.append(("transformers generate", "int8 (quantize_dynamic)", hf_decode(hf, prompt, TOKENS)[0]))
            del hf

        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            llama_cpp = None
        if llama_cpp is not None:
            from geb.gguf import export_gguf
            from geb.tokenizer import train_tokenizer  # llama.cpp needs a vocabulary in the file

            tok = train_tokenizer(["a b c " * 1000], tmp_path / "tok", min(model.config.vocab_size, 300))
            for qtype in ("f32", "q8_0"):
                path = export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
                speed, tokens = llama_cpp_decode(path, prompt, TOKENS, threads)
                rows.append(("llama.cpp", qtype.upper(), speed))
                if qtype == "f32":
                    assert tokens[:8] == ref[:8]

    print(f"\nCPU decode, preset {PRESET}, batch 1, {PROMPT_TOKENS}-token prompt, {TOKENS} new tokens, "
          f"{threads} threads, torch {torch.__version__}")
    print("| engine | weights | decode tok/s |\n|---|---|---|")
    for engine, weights, speed in rows:
        print(f"| {engine} | {weights} | {speed:.2f} |")
    assert all(speed > 0 for _, _, speed in rows)

"""geb.generate and geb.cpu_linear: KV-cache decoding equals full forwards, compiled equals eager, int8 stays close,
sampling is reproducible, streaming decodes exactly, long prompts and the context limit are handled."""

import copy
import json
from pathlib import Path

import pytest
import torch

from geb.config import ModelConfig
from geb.cpu_linear import convert_for_cpu, quantize_int8
from geb.generate import Generator, fit_prompt, sample
from geb.model import GEB

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=96)
    return ModelConfig(**{**base, **overrides})


def corpus_text() -> str:
    """English and Chinese text from the test fixtures (Chinese exercises byte fallback and multi-byte UTF-8)."""
    en = (CORPUS / "macbeth_act1.txt").read_text(encoding="utf-8")[:30000]
    zh = "\n".join(json.loads(line)["text"] for line in (CORPUS / "news_zh.jsonl").read_text().splitlines())[:20000]
    return en + "\n" + zh


def make_tokenizer(tmp_path: Path, vocab_size: int = 600):
    """A small byte-fallback SentencePiece tokenizer trained on the fixtures."""
    from geb.tokenizer import Tokenizer, train_tokenizer

    return Tokenizer(train_tokenizer([corpus_text()], tmp_path / "tok", vocab_size, num_threads=1))


def train_tiny(tokenizer, steps: int = 60, seed: int = 0) -> GEB:
    """A tiny model trained briefly on the fixtures, so its logits are peaked like a real model's."""
    torch.manual_seed(seed)
    config = small_config(vocab_size=tokenizer.vocab_size, d_model=96, n_heads=4, n_kv_heads=2, ffn_dim=256,
                          max_seq_len=128)
    model = GEB(config, impl="torch")
    data = torch.tensor(tokenizer.encode(corpus_text()), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[s:s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return train_tiny(tok), tok


def full_forward_greedy(model: GEB, prompt: list[int], n: int) -> list[int]:
    model.clear_kv_cache()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("n_kv_heads, norm_position", [(2, "pre"), (1, "pre"), (4, "post")])
def test_kv_cache_greedy_equals_full_forward(n_kv_heads, norm_position):
    torch.manual_seed(n_kv_heads)
    model = GEB(small_config(n_kv_heads=n_kv_heads, norm_position=norm_position), impl="torch").eval()
    prompt = torch.randint(0, 97, (7,)).tolist()
    ours = list(Generator(model).generate(prompt, 50, temperature=0.0))
    assert ours == full_forward_greedy(model, prompt, 50)


def test_kv_cache_logits_match_full_forward():
    torch.manual_seed(5)
    model = GEB(small_config(), impl="torch").eval()
    idx = torch.randint(0, 97, (1, 30))
    from geb.generate import forward_last
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_kv_cache(1, 40)
        got = [forward_last(model, idx[:, :10], torch.arange(10))]
        got += [forward_last(model, idx[:, t:t + 1], torch.tensor([t])) for t in range(10, 30)]
    torch.testing.assert_close(torch.stack(got[1:], 1)[0], full[0, 10:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0][0], full[0, 9], rtol=1e-5, atol=1e-5)


def test_generation_stops_at_context_limit_and_eos():
    torch.manual_seed(6)
    model = GEB(small_config(max_seq_len=32), impl="torch").eval()
    gen = Generator(model)
    from geb.generate import GenerationStats
    stats = GenerationStats()
    out = list(gen.generate([1, 2, 3, 4, 5], 100, temperature=0.0, stats=stats))
    # 27 free positions are filled, and the last filled position still predicts one more token.
    assert len(out) == 32 - 5 + 1 and stats.stop_reason == "context"
    eos = out[3]
    stats = GenerationStats()
    out2 = list(gen.generate([1, 2, 3, 4, 5], 100, temperature=0.0, eos_id=eos, stats=stats))
    assert out2 == out[:out.index(eos)] and stats.stop_reason == "eos"


def test_padded_vocabulary_is_never_sampled():
    # A model's vocabulary padded past its tokenizer's (GEB's 64,896): ids the tokenizer lacks must never come out.
    torch.manual_seed(8)
    model = GEB(small_config(), impl="torch").eval()
    with torch.no_grad():
        model.lm_head.weight[40:] *= 50  # make the padding ids the likely ones
    free = list(Generator(model).generate([1, 2, 3], 60, temperature=1.0, top_k=None, seed=0))
    assert max(free) >= 40  # without the limit, padding ids do come out
    limited = list(Generator(model).generate([1, 2, 3], 60, temperature=1.0, top_k=None, seed=0, vocab_size=40))
    greedy = list(Generator(model).generate([1, 2, 3], 20, temperature=0.0, vocab_size=40))
    assert max(limited) < 40 and max(greedy) < 40


def test_long_prompt_keeps_last_tokens(capsys):
    prompt = [i % 97 for i in range(100)]
    kept = fit_prompt(prompt, 64, 16)
    assert kept == prompt[-48:]
    assert "warning" in capsys.readouterr().err
    assert fit_prompt(prompt[:10], 64, 16) == prompt[:10]
    torch.manual_seed(7)
    model = GEB(small_config(max_seq_len=64), impl="torch").eval()
    out = list(Generator(model).generate(prompt, 8, temperature=0.0))
    assert out == full_forward_greedy(model, prompt[-56:], 8)  # keeps max(64 // 2, 64 - 8) tokens


def test_sampling_reproducible_and_filters():
    torch.manual_seed(8)
    model = GEB(small_config(), impl="torch").eval()
    gen = Generator(model)
    prompt = [3, 1, 4, 1, 5]
    a = list(gen.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.9, seed=123))
    b = list(gen.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.9, seed=123))
    c = list(gen.generate(prompt, 30, temperature=1.0, top_k=20, top_p=0.9, seed=124))
    assert a == b and a != c
    greedy = list(gen.generate(prompt, 20, temperature=0.0))
    assert list(gen.generate(prompt, 20, temperature=1.0, top_k=1, seed=0)) == greedy
    assert list(gen.generate(prompt, 20, temperature=1.0, top_p=1e-6, seed=0)) == greedy
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {2, 3}
    # top_p=0.7 keeps the smallest set whose mass reaches 0.7: {3, 2} (0.64 + 0.24).
    assert {sample(logits, 1.0, top_p=0.7, generator=g) for _ in range(200)} == {2, 3}


@pytest.mark.parametrize("method", ["fbgemm", "ao", "woq", "fused fbgemm"])
def test_int8_logits_close_to_fp32(trained, method):
    model, tok = trained
    idx = torch.tensor([tok.encode("Thunder and lightning. Enter three Witches. 新华社北京电")[:48]])
    with torch.no_grad():
        ref, _ = model(idx)
        q = copy.deepcopy(model)
        if method == "fused fbgemm":  # what infer_cpu.py --quant int8 runs
            assert convert_for_cpu(q, "int8") == "fbgemm" and q.layers[0].mlp.gate_up_proj is not None
        else:
            assert quantize_int8(q, method) == method
        got, _ = q(idx)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules()), "every linear, LM head included"
    cos = torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1)
    assert cos.min().item() >= 0.99, cos.min().item()
    # Decoding through the int8 model works with the static cache too.
    assert len(list(Generator(q).generate(idx[0].tolist(), 5, temperature=0.0))) == 5


@pytest.mark.parametrize("weights", ["plain", "onednn", "gemv"])
def test_fused_fp32_formats_match_plain(trained, weights, monkeypatch):
    model, tok = trained
    idx = torch.tensor([tok.encode("Thunder and lightning. Enter three Witches. 新华社北京电")[:48]])
    converted = copy.deepcopy(model)
    if weights != "gemv":  # what a machine without a C++ compiler (and, for "plain", without oneDNN) gets
        monkeypatch.setattr("geb.cpu_linear.load_gemv", lambda: False)
    if weights == "plain":
        monkeypatch.setattr("torch.backends.mkldnn.is_available", lambda: False)
    fmt = convert_for_cpu(converted, "none")
    if fmt != weights:
        pytest.skip(f"this machine cannot run {weights} weights")
    assert all(layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None
               for layer in converted.layers)
    linears = [m for m in converted.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (4 * len(converted.layers) + 1 if weights == "plain" else 0), "every linear, LM head"
    with torch.no_grad():
        ref64, _ = copy.deepcopy(model).double()(idx)
        plain, _ = model(idx)
        got, _ = converted(idx)  # a 48-token prefill: the batch-1 formats serve longer inputs too
    # Same values up to summation order: within twice plain fp32's own error against fp64.
    assert (got.double() - ref64).abs().max() <= 2 * (plain.double() - ref64).abs().max() + 1e-6
    prompt = idx[0, :8].tolist()
    assert list(Generator(converted).generate(prompt, 30, temperature=0.0)) == \
        list(Generator(model).generate(prompt, 30, temperature=0.0))


def test_gemv_kernel_against_fp64():
    """geb/gemv.cpp on odd shapes (row counts not a multiple of 4, lengths not a multiple of 16), with and without
    bias: one input row (the matrix-vector kernel), 2-64 rows (the tiled kernel, input counts not a multiple of its
    3) and 65 (at::linear), contiguous or not, against fp64."""
    import shutil

    from geb.cpu_linear import load_gemv

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or shutil.which("c++") is None:
        pytest.skip("geb's kernel needs an AVX2 CPU and a C++ compiler")
    assert load_gemv(), "geb/gemv.cpp failed to build (see the warning)"
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the module runs on one thread; the kernels split rows between threads
    cases = [(1, 1), (3, 5), (4, 16), (7, 17), (13, 47), (130, 300), (515, 2048), (2051, 96)]
    try:
        for n, k in cases:
            _check_linear_f32(n, k)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="last dimension must be 16"):
        torch.ops.geb.linear_f32(torch.randn(1, 15), torch.randn(4, 16), None)
    with pytest.raises(RuntimeError, match=r"bias must be float32 of shape \[4\]"):
        torch.ops.geb.linear_f32(torch.randn(1, 16), torch.randn(4, 16), torch.randn(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="no backward"):
        torch.ops.geb.linear_f32(torch.randn(1, 16, requires_grad=True), torch.randn(4, 16), None)



def test_f32_linear_short_and_long_prompts():
    """F32Linear: up to MAX_ROWS input rows on geb's kernels, more on oneDNN's GEMM over the same plain weight; both
    equal fp64 up to rounding, with and without bias."""
    from geb.cpu_linear import F32Linear, load_gemv

    if not load_gemv():
        pytest.skip("geb's kernel cannot be built here")
    torch.manual_seed(4)
    for bias in (False, True):
        linear = torch.nn.Linear(96, 70, bias=bias)
        layer = F32Linear(linear)
        assert layer.onednn_long_prompts == torch.backends.mkldnn.is_available()
        for rows in (1, F32Linear.MAX_ROWS, F32Linear.MAX_ROWS + 1, 200):
            x = torch.randn(1, rows, 96)
            with torch.no_grad():
                got, ref = layer(x), linear.double()(x.double())
                linear.float()
            assert got.shape == (1, rows, 70) and (got.double() - ref).abs().max() < 1e-4, rows

def _check_linear_f32(n: int, k: int) -> None:
    """geb::linear_f32 with an n x k weight, with and without bias, on every input layout, against fp64."""
    w, b = torch.randn(n, k), torch.randn(n)
    inputs = (torch.randn(k), torch.randn(1, 1, k), torch.randn(k, 2).t()[:1], torch.randn(2, k),
              torch.randn(2, 2, k), torch.randn(k, 7).t(), torch.randn(1, 64, k), torch.randn(65, k))
    for x in inputs:
        for bias in (None, b):
            got = torch.ops.geb.linear_f32(x, w, bias)
            ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            assert got.shape == ref.shape and got.dtype == torch.float32
            # fp32 rounding of a k-term dot product and of the bias: within a few ulps of their magnitude.
            eps = torch.finfo(torch.float32).eps
            tol = 4 * k ** 0.5 * eps * (x.abs().double() @ w.abs().double().t()).max() + eps * b.abs().max()
            assert (got.double() - ref).abs().max() <= tol, (n, k, tuple(x.shape))



def test_stale_build_lock_is_removed(tmp_path):
    """A lock left by a killed build of geb/gemv.cpp would make torch wait forever: an old one is removed, a fresh
    one (a build in progress elsewhere) is kept."""
    import os
    import time

    from geb.cpu_linear import _clear_stale_build_lock

    lock = tmp_path / "lock"
    lock.touch()
    _clear_stale_build_lock(tmp_path)
    assert lock.exists()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    with pytest.warns(UserWarning, match=f"removing {lock}: a build lock 60 minutes old"):
        _clear_stale_build_lock(tmp_path)
    assert not lock.exists()
    _clear_stale_build_lock(tmp_path)  # no lock: nothing to do

def test_stream_decoder_equals_one_shot(trained):
    model, tok = trained
    text = "When shall we three meet again 新华社北京电 ☃ 𝄞!"
    ids = tok.encode(text)
    gen_ids = list(Generator(model).generate(ids, 40, temperature=1.0, seed=3))
    for seq in (ids, gen_ids, ids + gen_ids):
        dec = tok.stream_decoder()
        streamed = "".join(dec.push(t) for t in seq) + dec.flush()
        assert streamed == tok.decode(seq)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["plain", "gemv", "fbgemm"])
def test_compiled_equals_eager_without_recompiles(weights):
    import torch._dynamo

    torch.manual_seed(9)
    model = GEB(small_config(), impl="torch").eval()
    if weights != "plain" and convert_for_cpu(model, "int8" if weights == "fbgemm" else "none") != weights:
        pytest.skip(f"this torch build has no {weights} weights")
    prompt = torch.randint(0, 97, (6,)).tolist()
    eager = list(Generator(model).generate(prompt, 24, temperature=0.0))
    torch._dynamo.reset()
    compiled = Generator(model, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert compiled.warmup() > 0
        out = list(compiled.generate(prompt, 24, temperature=0.0))
    assert out == eager

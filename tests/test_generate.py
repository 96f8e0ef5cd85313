"""geb.generate: KV-cache decoding equals full forwards, compiled equals eager, sampling is reproducible, streaming
decodes exactly, long prompts and the context limit are handled."""

import pytest
import torch
import torch._dynamo
from helpers import small_config

from geb.cpu_linear import convert_for_cpu
from geb.generate import Decoder, GenerationStats, fit_prompt, kv_bucket, sample
from geb.model import GEB

pytestmark = pytest.mark.usefixtures("one_thread")


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
    ours = list(Decoder(model).generate(prompt, 50, temperature=0.0))
    assert ours == full_forward_greedy(model, prompt, 50)


def test_generation_stops_at_context_limit_and_eos():
    torch.manual_seed(6)
    model = GEB(small_config(max_seq_len=32), impl="torch").eval()
    gen = Decoder(model)
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
    free = list(Decoder(model).generate([1, 2, 3], 60, temperature=1.0, top_k=None, seed=0))
    assert max(free) >= 40  # without the limit, padding ids do come out
    limited = list(Decoder(model).generate([1, 2, 3], 60, temperature=1.0, top_k=None, seed=0, vocab_size=40))
    greedy = list(Decoder(model).generate([1, 2, 3], 20, temperature=0.0, vocab_size=40))
    assert max(limited) < 40 and max(greedy) < 40


def test_long_prompt_keeps_last_tokens(capsys):
    prompt = [i % 97 for i in range(100)]
    kept = fit_prompt(prompt, 64, 16)
    assert kept == prompt[-48:]
    assert "warning" in capsys.readouterr().err
    assert fit_prompt(prompt[:10], 64, 16) == prompt[:10]
    torch.manual_seed(7)
    model = GEB(small_config(max_seq_len=64), impl="torch").eval()
    out = list(Decoder(model).generate(prompt, 8, temperature=0.0))
    assert out == full_forward_greedy(model, prompt[-56:], 8)  # keeps max(64 // 2, 64 - 8) tokens


def test_sampling_reproducible_and_filters():
    torch.manual_seed(8)
    model = GEB(small_config(), impl="torch").eval()
    gen = Decoder(model)
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


def _streamed(tok, seq: list[int]) -> str:
    dec = tok.stream_decoder()
    return "".join(dec.push(t) for t in seq) + dec.flush()


def test_stream_decoder_equals_one_shot(tokenizer):
    ids = tokenizer.encode("When shall we three meet again 新华社北京电 ☃ 𝄞!")
    assert _streamed(tokenizer, ids) == tokenizer.decode(ids)


# A sampled continuation of the tiny model holds cut UTF-8 sequences (e.g. E5 83 then a new character), which
# SentencePiece's decode replaces with one U+FFFD per byte: the stream decoder must do the same.
def test_stream_decoder_equals_one_shot_on_a_sampled_continuation(tiny_model, tokenizer):
    ids = tokenizer.encode("When shall we three meet again 新华社北京电 ☃ 𝄞!")
    gen_ids = list(Decoder(tiny_model).generate(ids, 40, temperature=1.0, seed=3))
    for seq in (gen_ids, ids + gen_ids):
        assert _streamed(tokenizer, seq) == tokenizer.decode(seq)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["plain", "gemv", "fbgemm", "q8_0", "q4_0"])
def test_compiled_equals_eager_without_recompiles(weights):
    torch.manual_seed(9)
    model = GEB(small_config(), impl="torch").eval()
    quant = {"fbgemm": "int8", "q8_0": "q8_0", "q4_0": "int4"}.get(weights, "none")
    if weights != "plain" and convert_for_cpu(model, quant) != weights:
        pytest.skip(f"this torch build has no {weights} weights")
    prompt = torch.randint(0, 97, (6,)).tolist()
    eager = list(Decoder(model).generate(prompt, 24, temperature=0.0))
    torch._dynamo.reset()
    compiled = Decoder(model, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert compiled.warmup() > 0
        out = list(compiled.generate(prompt, 24, temperature=0.0))
    assert out == eager
    if weights == "q4_0":  # without a warmup the step compiles after the first token, on positions past the prompt
        torch._dynamo.reset()
        stats = GenerationStats()
        lazy = Decoder(model, max_seq_len=len(prompt) + 3, compile=True)
        assert list(lazy.generate(prompt, 3, temperature=0.0, stats=stats)) == eager[:3] and stats.compile_s > 0


def test_kv_bucket():
    assert [kv_bucket(n, 2048) for n in (1, 64, 65, 128, 129, 1025, 2048)] == [64, 64, 128, 128, 256, 2048, 2048]
    assert kv_bucket(30, 48) == 48 and kv_bucket(5, 96, min_bucket=8) == 8 and kv_bucket(9, 96, min_bucket=8) == 16
    model = GEB(small_config(), impl="torch").eval()
    model.setup_kv_cache(1, 32)
    with pytest.raises(ValueError, match="kv_len 4 must cover position 5"):
        model(torch.tensor([[1]]), input_pos=torch.tensor([5]), kv_len=4)


@pytest.mark.slow
def test_compiled_buckets_equal_eager_and_compile_once_each():
    # Small buckets (8, 16, 32) so that a short generation crosses two bucket boundaries.
    torch.manual_seed(10)
    model = GEB(small_config(), impl="torch").eval()
    prompt = torch.randint(0, 97, (5,)).tolist()
    eager = Decoder(model, max_seq_len=40)
    ref = list(eager.generate(prompt, 20, temperature=0.0))
    ref_logits = [eager.step(t, 5 + i) for i, t in enumerate(ref[:-1])]  # the same steps again, eagerly
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Decoder(model, max_seq_len=40, compile=True, min_bucket=8)
    stats = GenerationStats()
    assert list(compiled.generate(prompt, 20, temperature=0.0, stats=stats)) == ref
    assert compiled.buckets == {8, 16, 32} and stats.compile_s > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # one graph per bucket, no recompile within
    caches = [layer.self_attn.kv_cache for layer in model.layers]
    saved = [(c.k.clone(), c.v.clone()) for c in caches]
    with torch.no_grad():
        # Positions 6..8 cross the 8 -> 16 boundary, 14..17 the 16 -> 32 one: logits equal the eager step's, with the
        # cache past the step's bucket poisoned (NaN): the step must not read it.
        for i in (1, 2, 3, 9, 10, 11, 12):
            bucket = compiled.bucket(5 + i + 1)
            for c in caches:
                c.k[:, bucket:] = c.v[:, bucket:] = float("nan")
            torch.testing.assert_close(compiled.step(ref[i], 5 + i), ref_logits[i], rtol=1e-4, atol=1e-4)
            for c, (k, v) in zip(caches, saved, strict=True):
                c.k.copy_(k)
                c.v.copy_(v)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3

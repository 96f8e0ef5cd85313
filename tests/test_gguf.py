"""GGUF export: the file reads back with gguf's reader (shapes, metadata, vocabulary), a NumPy Llama forward in
llama.cpp's conventions (interleaved-pair rotary) on the exported tensors gives geb's logits, and a failed export
leaves the previous file in place."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch

from geb.config import ModelConfig
from geb.cpu_linear import convert_for_cpu, dequantize_q4_0, dequantize_q8_0, load_gemv
from geb.generate import Decoder
from geb.gguf import BLOCK_TYPES, FILE_TYPES, export_gguf, permute_rotary
from geb.model import GEB

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(vocab_size: int, n_kv_heads: int = 2, tie: bool = False) -> GEB:
    torch.manual_seed(n_kv_heads)
    config = ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96,
                         max_seq_len=64, rope_theta=5000.0, tie_embeddings=tie)
    model = GEB(config, impl="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights so a misplaced norm shows
    return model


def read(path: Path) -> tuple[dict, dict]:
    """Tensors as fp32 (out, in) arrays and the metadata fields of a GGUF file."""
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (0, 1) else t.data
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
    return tensors, reader.fields


def field(fields: dict, key: str):
    return fields[key].contents()


def llama_cpp_style_logits(t: dict, meta: dict, ids: list[int]) -> np.ndarray:
    """A plain NumPy Llama forward as llama.cpp computes it: rotary on interleaved pairs (2i, 2i+1)."""
    n_head, n_kv = field(meta, "llama.attention.head_count"), field(meta, "llama.attention.head_count_kv")
    eps, base = field(meta, "llama.attention.layer_norm_rms_epsilon"), field(meta, "llama.rope.freq_base")
    x = t["token_embd.weight"][ids].astype(np.float64)
    T, d = x.shape
    hd = d // n_head
    ang = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(field(meta, "llama.block_count")):
        p = f"blk.{i}."
        h = norm(x, t[p + "attn_norm.weight"])
        q = rope((h @ t[p + "attn_q.weight"].T).reshape(T, n_head, hd))
        k = rope((h @ t[p + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ t[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", pr, v).reshape(T, d) @ t[p + "attn_output.weight"].T
        h = norm(x, t[p + "ffn_norm.weight"])
        g, u = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "ffn_down.weight"].T
    out = t.get("output.weight", t["token_embd.weight"])
    return norm(x, t["output_norm.weight"]) @ out.T


@pytest.mark.parametrize("n_kv_heads, tie", [(2, False), (1, True), (4, False)], ids=["gqa", "mqa-tied", "mha"])
def test_f32_export_reads_back_and_matches_logits(tmp_path, tokenizer_file, n_kv_heads, tie):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    vocab = sp.get_piece_size() + 5  # a model vocabulary larger than the tokenizer's is padded
    model = random_model(vocab, n_kv_heads, tie)
    path = export_gguf(model, tokenizer_file, tmp_path / "m.gguf", "f32")
    t, meta = read(path)
    c = model.config
    assert field(meta, "general.architecture") == "llama"
    assert field(meta, "llama.block_count") == 2 and field(meta, "llama.embedding_length") == 64
    assert field(meta, "llama.attention.head_count_kv") == n_kv_heads
    assert field(meta, "llama.context_length") == 64 and field(meta, "llama.feed_forward_length") == 96
    assert t["token_embd.weight"].shape == (vocab, 64)
    assert t["blk.0.attn_q.weight"].shape == (64, 64)
    assert t["blk.1.attn_k.weight"].shape == (n_kv_heads * c.head_dim, 64)
    assert t["blk.0.ffn_down.weight"].shape == (64, 96) and t["blk.0.ffn_gate.weight"].shape == (96, 64)
    assert ("output.weight" in t) == (not tie)
    assert len(t) == 2 + 9 * 2 + (not tie)
    tokens = field(meta, "tokenizer.ggml.tokens")
    assert len(tokens) == vocab and tokens[100] == sp.id_to_piece(100) and tokens[-1] == f"[PAD{vocab - 1}]"
    types = field(meta, "tokenizer.ggml.token_type")
    assert types[sp.unk_id()] == 2 and types[sp.bos_id()] == 3 and types[sp.piece_to_id("<0xE6>")] == 6
    assert field(meta, "tokenizer.ggml.eos_token_id") == sp.eos_id()
    assert field(meta, "tokenizer.ggml.bos_token_id") == sp.bos_id()
    ids = [sp.eos_id()] + sp.encode("When shall we three meet again 新华社")[:30]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    theirs = llama_cpp_style_logits(t, meta, ids)
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_quantized_export_is_close(tmp_path, tokenizer_file, qtype):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    model = random_model(sp.get_piece_size())
    t, meta = read(export_gguf(model, tokenizer_file, tmp_path / "m.gguf", qtype))
    kinds = {tt.name: tt.tensor_type for tt in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    want = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_q.weight"] == want and kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    ids = sp.encode("Thunder and lightning")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    theirs = llama_cpp_style_logits(t, meta, ids)
    cos = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cos.min() > 0.999


@pytest.mark.parametrize("qtype, quant", [("q4_0", "int4"), ("q8_0", "q8_0")])
def test_block_export_holds_the_quantized_weights(tmp_path, tokenizer_file, qtype, quant):
    """--type q4_0 / q8_0: Q4_0 / Q8_0 linear weights (norms f32) equal, value for value, the weights infer_cpu.py
    --quant int4 / q8_0 decodes with (geb's fused q/k/v and gate/up, q/k rows permuted as the export does)."""
    if not load_gemv():
        pytest.skip(f"--quant {quant} needs geb/gemv.cpp built (AVX2, a C++ compiler)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    model = random_model(sp.get_piece_size())
    path = export_gguf(model, tokenizer_file, tmp_path / "m.gguf", qtype)
    t, meta = read(path)
    kinds = {tt.name: tt.tensor_type for tt in gguf.GGUFReader(path).tensors}
    assert field(meta, "general.file_type") == FILE_TYPES[qtype]
    block = BLOCK_TYPES[qtype]
    assert {k for k, v in kinds.items() if v == block} == {k for k in kinds if not k.endswith("norm.weight")}
    assert all(kinds[k] == gguf.GGMLQuantizationType.F32 for k in kinds if k.endswith("norm.weight"))
    c = model.config
    convert_for_cpu(model, quant)
    dequantize = dequantize_q4_0 if qtype == "q4_0" else dequantize_q8_0

    def weight(linear) -> torch.Tensor:
        return dequantize(linear.qs, linear.scales, linear.in_features, linear.out_features)

    for i, layer in enumerate(model.layers):
        kv_dim = c.n_kv_heads * c.head_dim
        q, k, v = weight(layer.self_attn.qkv_proj).split([c.d_model, kv_dim, kv_dim])
        gate, up = weight(layer.mlp.gate_up_proj).chunk(2)
        ours = {"attn_q": permute_rotary(q, c.n_heads), "attn_k": permute_rotary(k, c.n_kv_heads), "attn_v": v,
                "attn_output": weight(layer.self_attn.o_proj), "ffn_gate": gate, "ffn_up": up,
                "ffn_down": weight(layer.mlp.down_proj)}
        for name, w in ours.items():
            assert np.array_equal(t[f"blk.{i}.{name}.weight"], w.numpy()), name
    assert np.array_equal(t["output.weight"], weight(model.lm_head).numpy())
    emb = model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(t["token_embd.weight"], gguf.quants.dequantize(gguf.quants.quantize(emb, block), block))


def test_export_is_atomic_and_refuses_bad_input(tmp_path, tokenizer_file, monkeypatch):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    out = export_gguf(random_model(sp.get_piece_size()), tokenizer_file, tmp_path / "m.gguf", "f16")
    before = out.read_bytes()
    too_small = random_model(sp.get_piece_size() - 1)  # a vocabulary the tokenizer's pieces do not fit in
    with pytest.raises(ValueError, match=f"{sp.get_piece_size()} pieces but the model's vocabulary is"):
        export_gguf(too_small, tokenizer_file, out, "f16")
    with pytest.raises(ValueError, match=r"--type must be one of \('f32', 'f16', 'q8_0', 'q4_0'\), got 'q4_1'"):
        export_gguf(too_small, tokenizer_file, out, "q4_1")
    narrow = GEB(ModelConfig(vocab_size=sp.get_piece_size(), d_model=48, n_layers=1, n_heads=2, n_kv_heads=1,
                             ffn_dim=64), impl="torch")
    with pytest.raises(ValueError, match="--type q4_0: token_embd.weight has 48 columns, not a multiple of 32"):
        export_gguf(narrow, tokenizer_file, out, "q4_0")
    post_norm = GEB(ModelConfig(vocab_size=sp.get_piece_size(), d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                ffn_dim=64, norm_position="post"), impl="torch")
    with pytest.raises(ValueError, match="norm_position='post' has no llama.cpp equivalent"):
        export_gguf(post_norm, tokenizer_file, out, "f32")

    def disk_full(writer, *args, **kwargs):  # the header and metadata are on disk, the tensors never arrive
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(random_model(sp.get_piece_size()), tokenizer_file, out, "f32")
    assert out.read_bytes() == before  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # and no temporary file is left behind


def test_llama_cpp_greedy_matches(tmp_path, tokenizer_file):
    llama_cpp = pytest.importorskip("llama_cpp")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    model = random_model(sp.get_piece_size())
    path = export_gguf(model, tokenizer_file, tmp_path / "m.gguf", "f32")
    ids = [sp.eos_id()] + sp.encode("When shall we three meet again")
    ours = list(Decoder(model).generate(ids, 20, temperature=0.0))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(tok)
        if len(theirs) == 20:
            break
    assert theirs == ours

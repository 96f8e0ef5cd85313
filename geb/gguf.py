"""GGUF export (llama.cpp's format): Llama layout, SentencePiece vocabulary, f32 / f16 / q8_0 / q4_0 weights.

    python -m geb.export gguf --ckpt out/tiny --out out/tiny.gguf [--type f32|f16|q8_0|q4_0] [--tokenizer PATH]

(`python -m geb.gguf export` with the same flags runs the same command under its older name.)

geb's rotary embedding is the rotate-half one of Hugging Face Llama; llama.cpp's "llama" architecture rotates
interleaved pairs (the original Meta layout). Like llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), the
rows of every q/k projection are permuted per head so that interleaved rotation of the permuted weights equals
rotate-half rotation of the originals.

q4_0 holds exactly the weights `infer_cpu.py --quant int4` decodes with (both are ggml's reference Q4_0 rounding;
permuting rows does not change a row's blocks). The token embedding is Q4_0 in the file too, as llama.cpp's own
Q4_0 files have it; geb keeps it fp32 (a lookup reads one row per token).
"""

import os
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from geb.config import ModelConfig
from geb.files import atomic_path
from geb.model import GEB

TYPES = ("f32", "f16", "q8_0", "q4_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
BLOCK_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (n_heads * head_dim, d) from rotate-half to interleaved-pair order, per head."""
    # Within a head, row i < D/2 pairs with row i + D/2 (rotate-half); llama.cpp pairs rows 2i and 2i+1.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: GEB) -> dict[str, torch.Tensor]:
    """geb parameters under llama.cpp's tensor names (q/k permuted), fp32, in file order."""
    c = model.config
    if c.norm_position != "pre":
        raise ValueError(f"norm_position={c.norm_position!r} has no llama.cpp equivalent; only 'pre' exports")
    out = {"token_embd.weight": model.embed_tokens.weight}
    for i, layer in enumerate(model.layers):
        a, m = layer.self_attn, layer.mlp
        out |= {
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
            f"blk.{i}.attn_q.weight": permute_rotary(a.q_proj.weight, c.n_heads),
            f"blk.{i}.attn_k.weight": permute_rotary(a.k_proj.weight, c.n_kv_heads),
            f"blk.{i}.attn_v.weight": a.v_proj.weight,
            f"blk.{i}.attn_output.weight": a.o_proj.weight,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_gate.weight": m.gate_proj.weight,
            f"blk.{i}.ffn_up.weight": m.up_proj.weight,
            f"blk.{i}.ffn_down.weight": m.down_proj.weight,
        }
    out["output_norm.weight"] = model.norm.weight
    if not c.tie_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        out["output.weight"] = model.lm_head.weight
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _vocab(tokenizer_path: str | os.PathLike, vocab_size: int) -> tuple[list[bytes], list[float], list[int], dict]:
    """Pieces, scores and token types of a SentencePiece model, padded to the model's vocabulary size."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    if len(proto.pieces) > vocab_size:
        raise ValueError(f"{tokenizer_path}: {len(proto.pieces)} pieces but the model's vocabulary is {vocab_size}")
    # SentencePiece's piece types use the same numbers as gguf.TokenType (NORMAL 1 ... UNUSED 5, BYTE 6).
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for i in range(len(tokens), vocab_size):  # rows the model has but the tokenizer never emits
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id(),
               "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}
    return tokens, scores, types, special


def add_model_metadata(w: gguf.GGUFWriter, c: ModelConfig, qtype: str, name: str) -> None:
    """The llama.* hyperparameters and the file type."""
    w.add_name(name)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(FILE_TYPES[qtype])


def add_vocabulary(w: gguf.GGUFWriter, tokenizer_path: str | os.PathLike, vocab_size: int) -> None:
    """The SentencePiece vocabulary as llama.cpp's "llama" tokenizer, with its special token ids."""
    tokens, scores, types, special = _vocab(tokenizer_path, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if special[key] >= 0:
            add(special[key])
    # geb prompts are token ids chosen by the caller (training documents follow EOS): no automatic BOS/EOS.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(bool(special["add_space_prefix"]))


def add_tensors(w: gguf.GGUFWriter, tensors: dict[str, torch.Tensor], qtype: str) -> None:
    """The weights in qtype; norms (1-d) stay f32, as llama.cpp's converter keeps them."""
    for key, t in tensors.items():
        arr = t.numpy()
        if arr.ndim == 1 or qtype == "f32":
            w.add_tensor(key, arr.astype(np.float32))
        elif qtype == "f16":
            w.add_tensor(key, arr.astype(np.float16))
        else:
            if arr.shape[-1] % 32:
                raise ValueError(f"--type {qtype}: {key} has {arr.shape[-1]} columns, not a multiple of 32 (the "
                                 "block size); use --type f16 or f32")
            data = gguf.quants.quantize(arr, BLOCK_TYPES[qtype])
            w.add_tensor(key, data, raw_shape=data.shape, raw_dtype=BLOCK_TYPES[qtype])


def export_gguf(model: GEB, tokenizer_path: str | os.PathLike, out: str | os.PathLike, qtype: str = "f32",
                name: str = "geb") -> Path:
    """Write model + vocabulary as a llama.cpp GGUF file (atomically: temporary file, then rename)."""
    if qtype not in TYPES:
        raise ValueError(f"--type must be one of {TYPES}, got {qtype!r}")
    tensors = gguf_tensors(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        add_model_metadata(w, model.config, qtype, name)
        add_vocabulary(w, tokenizer_path, model.config.vocab_size)
        add_tensors(w, tensors, qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


if __name__ == "__main__":
    # The frozen command `python -m geb.gguf export ...`: its code lives in geb.export, which imports this module, so
    # the import can only happen here, once this file runs as a script.
    from geb.export import legacy_main

    legacy_main("gguf")

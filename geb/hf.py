"""Hugging Face interop: export to / load from a transformers LlamaForCausalLM directory (safetensors).

The command line is `python -m geb.export hf --ckpt RUN --out DIR` (geb/export.py); `python -m geb.hf export`
runs the same command under its older name.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from geb.config import ModelConfig
from geb.files import atomic_dir
from geb.model import GEB


def hf_config(config: ModelConfig) -> dict:
    """The config.json of a LlamaForCausalLM with the same shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def export_hf(model: GEB, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Write config.json + model.safetensors (and tokenizer.model if given) that LlamaForCausalLM loads."""
    config = model.config
    if config.norm_position != "pre":
        raise ValueError(f"norm_position={config.norm_position!r} has no Llama equivalent; only 'pre' exports")
    out_dir = Path(out_dir)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del state["lm_head.weight"]  # safetensors refuses shared tensors; transformers re-ties from the config
    with atomic_dir(out_dir) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return out_dir


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Llama config.json dict; other architectures are refused."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, only 'llama' checkpoints load")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported (geb has no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: rope type {rope.get('rope_type')!r} is not supported, only 'default'")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise ValueError(f"{source}: head_dim {head_dim} x {n_heads} heads != hidden_size {hf['hidden_size']}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def load_hf(hf_dir: str | os.PathLike, impl: str = "auto") -> GEB:
    """A GEB model from a Hugging Face Llama directory (config.json + *.safetensors)."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a Hugging Face model directory")
    config = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir} (pytorch_model.bin is not supported)")
    state = {}
    for f in files:
        state.update(load_file(f))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    with torch.device("meta"):
        model = GEB(config, impl=impl)
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()) - {"rotary_emb.inv_freq"})
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: weights do not match the config (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


if __name__ == "__main__":
    # The frozen command `python -m geb.hf export ...`: its code lives in geb.export, which imports this module, so
    # the import can only happen here, once this file runs as a script.
    from geb.export import legacy_main

    legacy_main("hf")

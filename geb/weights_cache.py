"""Start-up cache for CPU inference: a checkpoint's weights as infer_cpu.py converts them, memory-mapped next time.

A training checkpoint is a pickle holding the model (and usually the optimizer's state): reading it means reading and
unpickling all of it, then fusing and converting (quantizing) the weights on every start. The first start with a
checkpoint and a --quant writes the converted weights to geb's cache dir (`GEB_CACHE`, default ~/.cache/geb) under
`cpu_weights/`; later starts map that file (torch.load(mmap=True): no copy, pages come from the OS page cache) into a
model built on the meta device. An entry is keyed by the checkpoint's resolved path and quant, and stamped with its size
and modification time (hashing gigabytes on every start would cost seconds) and this module's format version: a
checkpoint rewritten since is detected and its entry rebuilt, never used.
What is cached per quant: "none" the fused fp32 weights (geb's kernel reads the plain layout), "int4", "q8_0" and
"int8" the Q4_0, Q8_0 and per-channel int8 weights in geb/gemv.cpp's layouts. Without geb's kernel (no C++
compiler), --quant int8 runs on FBGEMM, whose packed weights are opaque objects: nothing is cached then.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from geb.checkpoint import list_checkpoints
from geb.config import ModelConfig
from geb.cpu_linear import ChannelInt8Linear, F32Linear, Int4Linear, Q8Linear, _replace_linears
from geb.files import atomic_path, cache_dir
from geb.model import GEB

FORMAT_VERSION = 2  # 2: Q4_0 rows interleaved in groups of 16; int8 as geb's per-channel int8
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


def checkpoint_file(source: str | os.PathLike) -> Path | None:
    """The checkpoint file infer_cpu.py would load from source (a run dir's newest, or the file itself); None for a
    Hugging Face directory or anything else (not cached)."""
    source = Path(source)
    if source.is_file():
        return source.resolve()
    found = list_checkpoints(source) if source.is_dir() else []
    return found[-1].resolve() if found else None


def entry_dir(ckpt: Path, quant: str, root: Path | None = None) -> Path:
    """The cache entry of (checkpoint path, quant)."""
    key = hashlib.sha256(f"{ckpt.resolve()}\0{quant}".encode()).hexdigest()[:20]
    return (root or cache_dir()) / "cpu_weights" / key


def stamp(ckpt: Path, quant: str) -> dict:
    """What an entry must match to be used: the checkpoint's path, size and mtime, the quant and the format."""
    st = ckpt.stat()
    return {"checkpoint": str(ckpt.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "quant": quant,
            "format": FORMAT_VERSION, "torch": torch.__version__}


def _file_stamp(path: Path) -> list[int] | None:
    """Size and mtime of a file; None if it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class _SkipInit(TorchFunctionMode):
    """Weight initialization as a no-op (the weights are assigned from the cache afterwards)."""

    INIT = ("normal_", "uniform_", "zero_", "fill_", "zeros_", "ones_", "kaiming_uniform_", "trunc_normal_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _meta_linear(in_features: int, out_features: int) -> nn.Linear:
    with torch.device("meta"), _SkipInit():
        return nn.Linear(in_features, out_features, bias=False)


def _skeleton(config: ModelConfig, quant: str) -> GEB:
    """A meta-device model with the module structure of convert_for_cpu(model, quant), weights not computed.
    Built without running tensor ops on the meta device: their Python meta kernels import torch._dynamo (~3 s)."""
    with torch.device("meta"), _SkipInit():
        model = GEB(config)
    kv_dim = config.n_kv_heads * config.head_dim
    for layer in model.layers:  # the structure model.fuse_projections() leaves
        a, m = layer.self_attn, layer.mlp
        a.qkv_proj = _meta_linear(config.d_model, config.n_heads * config.head_dim + 2 * kv_dim)
        m.gate_up_proj = _meta_linear(config.d_model, 2 * config.ffn_dim)
        del a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj
    if quant == "none":
        _replace_linears(model, F32Linear)
    elif quant == "int4":
        _replace_linears(model, Int4Linear.empty_like)
    elif quant == "q8_0":
        _replace_linears(model, Q8Linear.empty_like)
    elif quant == "int8":
        _replace_linears(model, ChannelInt8Linear.empty_like)
    return model


def load_cached(ckpt: Path, quant: str, root: Path | None = None) -> tuple[GEB, Path | None] | None:
    """The converted model (memory-mapped weights) and tokenizer path cached for (ckpt, quant); None if there is no
    entry or it is stale (the checkpoint changed since: the caller converts again and saves)."""
    entry = entry_dir(ckpt, quant, root)
    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("stamp") != stamp(ckpt, quant):
        return None
    tokenizer = Path(meta["tokenizer"]) if meta.get("tokenizer") else None
    if tokenizer is not None and meta.get("tokenizer_stamp") != _file_stamp(tokenizer):
        return None  # the checkpoint's tokenizer was replaced or removed: check it again through the checkpoint
    try:
        state = torch.load(entry / WEIGHTS_FILE, mmap=True, weights_only=True)
        model = _skeleton(ModelConfig.from_dict(meta["config"]), quant)
        model.load_state_dict(state, assign=True)
    except (OSError, RuntimeError, KeyError, ValueError):  # a damaged entry: rebuilt by the caller
        return None
    return model.eval(), tokenizer


def save_cached(ckpt: Path, quant: str, model: GEB, tokenizer: Path | None, root: Path | None = None) -> Path:
    """Write model's converted weights as the entry of (ckpt, quant): weights first, then the stamp, each through a
    temporary file, so an entry is used only once complete."""
    entry = entry_dir(ckpt, quant, root)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / META_FILE).unlink(missing_ok=True)  # the old stamp goes first: a half-written entry is never used
    with atomic_path(entry / WEIGHTS_FILE) as tmp:
        torch.save(model.state_dict(), tmp)
    meta = {"stamp": stamp(ckpt, quant), "config": model.config.to_dict(),
            "tokenizer": str(tokenizer.resolve()) if tokenizer else None,
            "tokenizer_stamp": _file_stamp(tokenizer) if tokenizer else None}
    with atomic_path(entry / META_FILE) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    return entry

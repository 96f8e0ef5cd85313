"""Reading a data directory: the manifest check, memory-mapped shards, the training loader and eval windows.

The directory is written by `python -m geb.data prepare` (see docs/data.md for its layout and manifest fields).
`TokenLoader` yields (inputs, targets) training batches in a seeded order, disjoint across ranks and exactly
resumable from its state_dict; `iter_eval_windows` scores every token of a split once, for bits-per-byte.

With doc_mask=True both also yield per-token positions: the packed-batch format (inputs, targets, positions), with
targets -100 where nothing is scored, that document-masked attention reads (`segments` turns positions into the
cumulative lengths of `kernels.flash_attn_varlen_func`).
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from geb.corpus import DataError
from geb.files import file_sha256

FORMAT = "geb-tokens-v1"
IGNORE_INDEX = -100  # padding targets in eval batches; F.cross_entropy's default ignore_index
_MAX_OPEN_SHARDS = 128  # LRU of memory maps: keeps file descriptors bounded for corpora of thousands of shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_manifest(data_dir: str | os.PathLike, *, model_vocab_size: int | None = None, verify: bool = False) -> dict:
    """Load DIR/manifest.json and check it against the directory; raise DataError naming the bad file.

    Always (cheap, no shard is opened): manifest parses and has every field, tokenizer.model hashes to the
    recorded sha256, every shard exists with its recorded byte size (a truncated shard fails here, before training
    starts), the vocabulary fits `model_vocab_size` when given. With verify=True also: each shard's Arrow footer
    (row count, dtype) and sha256. Shard token counts are also checked whenever the loader maps a shard.
    """
    d = Path(data_dir)
    mpath = d / "manifest.json"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{mpath}: missing (build it with `python -m geb.data prepare --out {d}`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath}: corrupt manifest ({e})") from e
    try:
        if m["format"] != FORMAT:
            raise DataError(f"{mpath}: format {m['format']!r}, expected {FORMAT!r}")
        tok, dtype = m["tokenizer"], np.dtype(m["dtype"])
        splits = {s: m["splits"][s] for s in ("train", "val")}
        for s, sp in splits.items():
            if sum(e["tokens"] for e in sp["shards"]) != sp["tokens"]:
                raise DataError(f"{mpath}: {s} shard token counts do not add up to {sp['tokens']}")
            sp["bytes"], sp["documents"]  # noqa: B018 -- presence check
    except (KeyError, TypeError) as e:
        raise DataError(f"{mpath}: corrupt manifest (missing or bad field {e})") from e
    tpath = d / tok["file"]
    if not tpath.exists():
        raise DataError(f"{tpath}: tokenizer missing (manifest {mpath} needs it)")
    sha = file_sha256(tpath)
    if sha != tok["sha256"] or m.get("tokenizer_sha256", sha) != sha:
        raise DataError(f"{tpath}: sha256 {sha[:12]}... does not match the manifest's {tok['sha256'][:12]}...; "
                        "shards were made with another tokenizer")
    if token_dtype(m["vocab_size"]) != dtype:
        raise DataError(f"{mpath}: dtype {dtype} cannot hold vocab_size {m['vocab_size']}")
    if model_vocab_size is not None and m["vocab_size"] > model_vocab_size:
        raise DataError(f"{tpath}: tokenizer vocab_size {m['vocab_size']} is larger than the model's "
                        f"vocab_size {model_vocab_size}")
    for sp in splits.values():
        for e in sp["shards"]:
            p = d / e["file"]
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{p}: shard missing (listed in {mpath})") from None
            if size != e["bytes"]:
                raise DataError(f"{p}: shard is {size} bytes, manifest says {e['bytes']} (truncated or replaced)")
            if verify:
                _open_shard(p, e["tokens"], dtype)
                if e.get("sha256") and file_sha256(p) != e["sha256"]:
                    raise DataError(f"{p}: sha256 does not match the manifest (corrupt shard)")
    m["data_dir"] = str(d)
    return m


def split_bytes(manifest: dict, split: str, tokens_scored: int | None = None) -> float:
    """UTF-8 bytes behind a split, for bits-per-byte; prorated when only `tokens_scored` of its tokens were scored."""
    sp = manifest["splits"][split]
    if tokens_scored is None or tokens_scored >= sp["tokens"]:
        return float(sp["bytes"])
    return sp["bytes"] * tokens_scored / sp["tokens"]


def _open_shard(path: Path, n_tokens: int, dtype: np.dtype) -> np.ndarray:
    """Memory-map one shard and return its tokens as a read-only numpy view of the map (no copy)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches != 1 or reader.schema.names != ["tokens"]:
            raise DataError(f"{path}: not a geb shard (want one record batch with one 'tokens' column)")
        col = reader.get_batch(0).column(0)
        arr = col.to_numpy(zero_copy_only=True)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt shard ({e})") from e
    if arr.dtype != dtype or len(arr) != n_tokens:
        raise DataError(f"{path}: holds {len(arr)} {arr.dtype} tokens, manifest says {n_tokens} {dtype}")
    return arr


class _Shards:
    """A split as one virtual token array over its shards, each memory-mapped on first use (LRU-bounded)."""

    def __init__(self, data_dir: Path, shards: list[dict], dtype: np.dtype) -> None:
        self.dir, self.entries, self.dtype = data_dir, shards, dtype
        counts = np.array([e["tokens"] for e in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])
        self._starts = self.starts.tolist()  # bisect on a list beats np.searchsorted for one scalar
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def shard(self, i: int) -> np.ndarray:
        """The tokens of shard i, mapping it (and unmapping the least recently used) if needed."""
        arr = self._open.get(i)
        if arr is None:
            e = self.entries[i]
            arr = self._open[i] = _open_shard(self.dir / e["file"], e["tokens"], self.dtype)
            if len(self._open) > _MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return arr

    def read(self, start: int, out: np.ndarray) -> int:
        """Copy tokens [start, start+len(out)) into out (clipped at the end); return how many were copied."""
        n = min(len(out), self.n - start)
        i = bisect.bisect_right(self._starts, start) - 1
        off = start - self._starts[i]
        if off + n <= self._starts[i + 1] - self._starts[i]:  # the common case: inside one shard
            out[:n] = self.shard(i)[off : off + n]
            return n
        done = 0
        while done < n:
            off = start + done - self._starts[i]
            take = min(n - done, self._starts[i + 1] - start - done)
            out[done : done + take] = self.shard(i)[off : off + take]
            done += take
            i += 1
        return n


def doc_positions(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token positions of a (B, T) batch of packed documents, restarting at 0 at every EOS and at each row start.

    The EOS that ends a document opens the next segment (position 0), as `[eos] + text` does when a document is
    scored alone: attention within segments predicts each document's first token from that EOS only, and the
    document's EOS target from the document itself. So no token is predicted from the previous document.
    """
    o_t = torch.arange(inputs.shape[-1], device=inputs.device).expand_as(inputs)
    starts = (inputs == eos_id) | (o_t == 0)
    return o_t - torch.where(starts, o_t, 0).cummax(-1).values


def _segments(positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The segments of a (B, T) positions batch flattened to B*T tokens: int32 cumulative lengths (a segment starts
    where the position is 0) and the longest length, as `kernels.flash_attn_varlen_func` takes them."""
    if positions.dim() != 2 or positions.shape[1] == 0 or bool((positions[:, 0] != 0).any()):
        raise ValueError(f"positions must be 0 at the start of every row of a (B, T) batch (shape "
                         f"{tuple(positions.shape)})")
    flat = positions.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def __getattr__(name: str):
    """segments: _segments run eagerly inside a compiled model (data-dependent sizes: between its graphs). Made on
    first use: torch.compiler.disable imports torch._dynamo, ~1 s that CPU inference's start-up would pay at import."""
    if name != "segments":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = globals()[name] = torch.compiler.disable(_segments)
    return fn


def _split_shards(m: dict, split: str) -> _Shards:
    if split not in m["splits"]:
        raise DataError(f"{m['data_dir']}/manifest.json: no split {split!r} (have {sorted(m['splits'])})")
    return _Shards(Path(m["data_dir"]), m["splits"][split]["shards"], np.dtype(m["dtype"]))


class TokenLoader:
    """Infinite iterator of (inputs, targets) int64 batches of shape (batch_size, seq_len), shuffled per epoch.

    The split is one token stream cut into windows of seq_len + 1 tokens at stride seq_len: window w holds tokens
    [w*seq_len, (w+1)*seq_len], so every token after the first is a target exactly once per epoch (up to the
    dropped tail, see below). Each epoch visits the windows in the order `perm(seed, epoch)`; global step s takes
    the next world_size * batch_size of them and rank r gets the r-th block of batch_size, so ranks are disjoint.
    An epoch ends when fewer than a global batch of windows is left (they are dropped this epoch; the permutation
    differs next epoch, so no window is always dropped).

    With doc_mask=True each batch is (inputs, targets, positions): `doc_positions` of the inputs, windows and order
    unchanged (so resuming is exactly as without).

    Resume: the state is (epoch, windows consumed so far this epoch). It is the same on every rank, and resuming it
    under another world_size or batch_size re-shards exactly: the run continues from the same window of the
    same permutation. seed, seq_len, split and the data itself must match, otherwise load_state_dict refuses.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, *, model_vocab_size: int | None = None,
                 doc_mask: bool = False) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.manifest = read_manifest(data_dir, model_vocab_size=model_vocab_size)
        self.data_dir, self.split, self.seq_len, self.batch_size = Path(data_dir), split, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.doc_mask = rank, world_size, seed, doc_mask
        self.eos_id = self.manifest["tokenizer"]["eos_id"]
        self._shards = _split_shards(self.manifest, split)
        self.n_tokens = self._shards.n
        self.n_windows = max(self.n_tokens - 1, 0) // seq_len
        self.global_batch = batch_size * world_size
        if self.n_windows < self.global_batch:
            raise DataError(f"{self.data_dir}/manifest.json: {split} split has {self.n_tokens} tokens = "
                            f"{self.n_windows} windows of {seq_len + 1}, fewer than one global batch "
                            f"({batch_size} x {world_size} ranks)")
        self.steps_per_epoch = self.n_windows // self.global_batch
        self.tokens_per_epoch = self.steps_per_epoch * self.global_batch * seq_len  # targets, all ranks
        self.epoch = 0
        self.position = 0  # windows consumed (all ranks together) in this epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            # int32 halves the one per-epoch array that grows with the data (4 bytes per window).
            self._perm = np.arange(self.n_windows, dtype=np.int32 if self.n_windows < 1 << 31 else np.int64)
            rng.shuffle(self._perm)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.position + self.global_batch > self.n_windows:
            self.epoch += 1
            self.position = 0
        lo = self.position + self.rank * self.batch_size
        windows = self._permutation()[lo : lo + self.batch_size]
        self.position += self.global_batch
        return self._batch(windows)

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, ...]:
        T = self.seq_len
        buf = np.empty((len(windows), T + 1), dtype=np.int64)
        for row, w in zip(buf, windows, strict=True):
            self._shards.read(int(w) * T, row)
        x = torch.from_numpy(buf)
        inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        if self.doc_mask:
            return inputs, targets, doc_positions(inputs, self.eos_id)
        return inputs, targets

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this loader is (identical on all ranks)."""
        return {
            "format": FORMAT,
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
            "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict; another world_size/batch_size is fine (exact re-shard), other data is not."""
        mine = self.state_dict()
        for k in ("split", "seed", "seq_len", "n_tokens", "tokenizer_sha256"):
            if state.get(k) != mine[k]:
                raise DataError(f"{self.data_dir}: loader state has {k}={state.get(k)!r} but this loader has "
                                f"{k}={mine[k]!r}; cannot resume exactly")
        if not 0 <= state["position"] <= self.n_windows:
            raise DataError(f"{self.data_dir}: loader state position {state['position']} out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_eval_windows(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                      world_size: int = 1, *, doc_mask: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Deterministic pass scoring every token of a split exactly once; yields (inputs, targets) int64 batches.

    The stream is [eos] + split tokens, so the split's first token is scored too and the scored bytes are exactly
    manifest["splits"][split]["bytes"] (bits-per-byte = sum of NLL / ln 2 / that). The last window is padded:
    inputs with pad_id, targets with -100 (F.cross_entropy's default ignore_index); the last batch may have fewer
    rows. With world_size > 1, rank r gets batches r, r + world_size, ...; sum the losses over ranks. With
    doc_mask=True each batch also carries `doc_positions` of its inputs, so every document is scored alone.
    """
    m = read_manifest(data_dir)
    shards = _split_shards(m, split)
    eos, pad = m["tokenizer"]["eos_id"], m["tokenizer"]["pad_id"]
    pad = pad if pad >= 0 else eos  # tokenizers without a pad id: any valid id will do, its targets are ignored
    T = seq_len
    n_windows = -(-shards.n // T)
    for b, w0 in enumerate(range(0, n_windows, batch_size)):
        if b % world_size != rank:
            continue
        rows = min(batch_size, n_windows - w0)
        buf = np.full((rows, T + 1), pad, dtype=np.int64)
        tgt_valid = np.zeros(rows, dtype=np.int64)
        for r in range(rows):
            s = (w0 + r) * T  # position in the eos-prefixed stream
            if s == 0:
                buf[r, 0] = eos
                got = shards.read(0, buf[r, 1:])
                tgt_valid[r] = got
            else:
                got = shards.read(s - 1, buf[r])
                tgt_valid[r] = got - 1
        x = torch.from_numpy(buf)
        # clone: with one row both slices are already contiguous views of x, and masking targets would edit inputs.
        inputs, targets = x[:, :-1].clone(), x[:, 1:].clone()
        mask = torch.arange(T)[None, :] >= torch.from_numpy(tgt_valid)[:, None]
        targets[mask] = IGNORE_INDEX
        yield (inputs, targets, doc_positions(inputs, eos)) if doc_mask else (inputs, targets)

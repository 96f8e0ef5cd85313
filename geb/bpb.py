"""Bits per byte: a model's loss on a prepared corpus split or on a text, in bits per UTF-8 byte.

bpb = Σ NLL (nats) / (ln 2 × UTF-8 bytes). The tokens are read as one stream, [EOS] + the text's tokens (a split's
documents each end with EOS), cut into consecutive windows of seq_len (default: the model's context), so every
token is predicted exactly once and the first one after an EOS, as documents follow EOS in training. The bytes are
those of the text itself (a split's from its manifest), so figures compare across tokenizers; with max_tokens only
a prefix of a split is scored and its bytes are prorated. See docs/eval.md for the protocol.

Also home to what the benchmark harness (geb.tasks) shares with it: EvalError, the stderr log and progress line,
doc_start (the token a document follows) and eval_mode.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from geb.loader import iter_eval_windows, read_manifest, split_bytes
from geb.tokenizer import Tokenizer

# (inputs, targets) or, for a model trained with document masking, (inputs, targets, positions); a target < 0 is not
# scored
Batches = Iterable[tuple[torch.Tensor, ...]]


class EvalError(ValueError):
    """Bad task name, task file or evaluation input; the message names it."""


def log(msg: str) -> None:
    """One line on stderr, prefixed [geb.eval]."""
    print(f"[geb.eval] {msg}", file=sys.stderr, flush=True)


class Progress:
    """A one-line progress indicator on stderr (rewritten in place on a terminal, every 30 s otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.t0, self.last = 0, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        """Count n more done; print when the refresh interval has passed or all are done."""
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= (0.5 if self.tty else 30.0) or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            line = f"[geb.eval] {self.label}: {self.done}/{self.total} ({rate:.0f}/s, eta {eta:.0f}s)"
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the line on a terminal."""
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def doc_start(tokenizer: Tokenizer) -> list[int]:
    """The context a document starts from: [EOS] (training data puts EOS after every document), else [BOS]."""
    for tid in (getattr(tokenizer, "eos_id", -1), getattr(tokenizer, "bos_id", -1)):
        if tid is not None and tid >= 0:
            return [tid]
    raise EvalError("the tokenizer has neither an EOS nor a BOS id to start a document with")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block; its training flag is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_seq_len(model: nn.Module, seq_len: int | None) -> int:
    """seq_len, or the model's context when None; an EvalError unless 1 <= seq_len <= the model's context."""
    seq_len = seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise EvalError(f"seq_len must be in [1, {model.config.max_seq_len}], got {seq_len}")
    return seq_len


@torch.inference_mode()
def _nll_windows(model: nn.Module, windows: Batches, device, progress: Progress | None) -> tuple[float, int]:
    """Σ NLL (nats) and the number of scored targets (>= 0) over (inputs, targets[, positions]) batches."""
    total, count = 0.0, 0
    for inputs, targets, *positions in windows:
        inputs, targets = inputs.to(device), targets.to(device).long()
        logits, _ = model(inputs, positions=positions[0].to(device)) if positions else model(inputs)
        mask = targets >= 0
        nll = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
        total += nll.double().sum().item()  # fp64 sum: a split has millions of terms
        n = int(mask.sum())
        count += n
        if progress is not None:
            progress.update(n)
    return total, count


def _bpb_result(nll: float, tokens: int, n_bytes: float) -> dict:
    if tokens == 0 or n_bytes <= 0:
        raise EvalError("nothing to score (no tokens)")
    loss = nll / tokens
    return {"loss": loss, "bpb": nll / (math.log(2) * n_bytes), "tokens": tokens, "bytes": n_bytes,
            "ppl": math.exp(loss)}


def _text_windows(stream: list[int], seq_len: int, batch_size: int) -> Batches:
    """Consecutive windows of seq_len targets over the token stream, batch_size at a time, the last one padded."""
    starts = range(0, len(stream) - 1, seq_len)
    for b in range(0, len(starts), batch_size):
        chunk = [stream[s:s + seq_len + 1] for s in starts[b:b + batch_size]]
        width = max(len(c) for c in chunk) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -1, dtype=torch.long)
        for r, c in enumerate(chunk):
            inputs[r, :len(c) - 1] = torch.tensor(c[:-1])
            targets[r, :len(c) - 1] = torch.tensor(c[1:])
        yield inputs, targets


def bits_per_byte_text(model: nn.Module, tokenizer: Tokenizer | str | os.PathLike, text: str,
                       seq_len: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                       progress: bool = False) -> dict:
    """bpb of one text: every token of it is predicted once, in windows of seq_len starting after an EOS."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer(tokenizer)
    seq_len = check_seq_len(model, seq_len)
    stream = doc_start(tokenizer) + tokenizer.encode(text)  # as iter_eval_windows: the first token is scored too
    with eval_mode(model):
        bar = Progress(len(stream) - 1, "text bpb", progress)
        nll, tokens = _nll_windows(model, _text_windows(stream, seq_len, batch_size), device, bar)
        bar.close()
    return _bpb_result(nll, tokens, len(text.encode("utf-8")))


def bits_per_byte(model: nn.Module, data_dir: str | os.PathLike, split: str = "val", seq_len: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None, device: str | torch.device = "cpu",
                  progress: bool = False, rank: int = 0, world_size: int = 1, doc_mask: bool = False) -> dict:
    """bpb of a prepared corpus split: Σ NLL / (ln 2 × UTF-8 bytes), the bytes read from the manifest.

    Every token of the split (documents and their EOS) is scored once, in windows of seq_len, in order. With
    max_tokens only the first max_tokens are scored and the bytes are prorated (bytes × scored / total tokens),
    which assumes the scored prefix has the split's average bytes per token. With world_size > 1 (call it on every
    rank of an initialized process group) each rank scores every world_size-th batch and the sums are all-reduced;
    every rank makes the same number of forward calls (the last round is padded with a batch that scores nothing),
    as a sharded (FSDP) model's all-gathers need. doc_mask=True (for a model trained with --doc-mask) scores each
    document alone: the model gets the windows' per-token positions, attention stays within documents.
    Returns loss (nats/token), bpb, tokens, bytes, ppl and split_tokens.
    """
    m = read_manifest(data_dir, model_vocab_size=model.config.vocab_size)
    if split not in m["splits"]:
        raise EvalError(f"{data_dir}: no split {split!r} (have {sorted(m['splits'])})")
    seq_len = check_seq_len(model, seq_len)
    if max_tokens is not None and max_tokens < 1:
        raise EvalError(f"max_tokens must be >= 1, got {max_tokens}")
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise EvalError(f"world_size {world_size} needs an initialized torch.distributed process group")
    total = m["splits"][split]["tokens"]
    with eval_mode(model):
        bar = Progress(-(-min(total, max_tokens or total) // world_size), f"{split} bpb", progress)
        windows = rank_windows(data_dir, split, seq_len, batch_size, max_tokens, rank, world_size, total, doc_mask)
        nll, tokens = _nll_windows(model, windows, device, bar)
        bar.close()
    if world_size > 1:
        sums = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        nll, tokens = sums[0].item(), int(round(sums[1].item()))
    res = _bpb_result(nll, tokens, split_bytes(m, split, tokens))
    res["split_tokens"] = total
    return res


def _split_windows(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, max_tokens: int | None,
                   rank: int, world_size: int, doc_mask: bool = False) -> Batches:
    """This rank's eval windows of the split, with targets past the first max_tokens tokens masked out."""
    windows = iter_eval_windows(data_dir, split, seq_len, batch_size, rank, world_size, doc_mask=doc_mask)
    for k, (inputs, targets, *positions) in enumerate(windows):
        if max_tokens is not None:
            # Windows are consecutive: target (row r, column t) of batch b is token (b*B + r)*T + t of the split.
            first = (rank + k * world_size) * batch_size * seq_len
            if first >= max_tokens:
                break
            pos = first + torch.arange(targets.numel()).view(targets.shape)
            targets = targets.masked_fill(pos >= max_tokens, -1)
        yield inputs, targets, *positions


def eval_calls(split_tokens: int, seq_len: int, batch_size: int, max_tokens: int | None, world_size: int) -> int:
    """The number of batches each rank runs: the split's batches (those that reach into the first max_tokens)
    dealt round-robin, rounded up to whole rounds."""
    windows = -(-split_tokens // seq_len)
    batches = -(-windows // batch_size)
    if max_tokens is not None:
        batches = min(batches, -(-max_tokens // (batch_size * seq_len)))
    return -(-batches // world_size)


def rank_windows(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, max_tokens: int | None,
                 rank: int, world_size: int, split_tokens: int, doc_mask: bool = False) -> Batches:
    """This rank's eval batches, then padding batches (one row, no scored target) up to eval_calls batches."""
    calls = eval_calls(split_tokens, seq_len, batch_size, max_tokens, world_size)
    made = 0
    for batch in _split_windows(data_dir, split, seq_len, batch_size, max_tokens, rank, world_size, doc_mask):
        made += 1
        yield batch
    pad = (torch.arange(seq_len)[None],) if doc_mask else ()  # one document of padding tokens
    for _ in range(calls - made):
        yield torch.zeros(1, seq_len, dtype=torch.long), torch.full((1, seq_len), -1, dtype=torch.long), *pad

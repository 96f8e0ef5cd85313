"""Helpers the test modules share (fixtures built on them live in conftest.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from geb.config import ModelConfig
from geb.loader import doc_positions
from geb.model import GEB

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
WORDS = ("the a sun rock light water plant seed tree river stone cloud rain snow wind fire cold warm big small red "
         "blue green apple bread milk house door road city ship boat bird fish horse cat dog run walk swim fly "
         "read write open close bright dark quick slow").split()


def small_config(**overrides) -> ModelConfig:
    """A model config small enough for a test to build, run and train in well under a second."""
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=96)
    return ModelConfig(**{**base, **overrides})


def corpus_text() -> str:
    """English and Chinese text from the test fixtures (Chinese exercises byte fallback and multi-byte UTF-8)."""
    en = (CORPUS / "macbeth_act1.txt").read_text(encoding="utf-8")[:30000]
    zh = "\n".join(json.loads(line)["text"] for line in (CORPUS / "news_zh.jsonl").read_text().splitlines())[:20000]
    return en + "\n" + zh


def train_tiny(token_ids: list[int], config: ModelConfig, steps: int = 60, seed: int = 0) -> GEB:
    """A tiny model trained briefly on token_ids, so its logits are peaked like a real model's."""
    torch.manual_seed(seed)
    model = GEB(config, impl="torch")
    data = torch.tensor(token_ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,))
        batch = torch.stack([data[s:s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


class Uniform(nn.Module):
    """All-zero logits: every token costs exactly ln(vocab) nats."""

    def __init__(self, vocab_size: int, max_seq_len: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.config.vocab_size), None


def packed_batch(lengths_per_row: list[list[int]], vocab: int = 97, eos: int = 2, seed: int = 0):
    """idx, targets and positions of rows of packed documents: each segment is EOS + a document's tokens, except a
    row's first, which may continue a document (as the loader cuts windows), and a few targets are -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        row = []
        for i, n in enumerate(lengths):
            body = torch.randint(3, vocab, (n,), generator=g).tolist()
            row += body if i == 0 else [eos] + body
        rows.append(row)
    assert len({len(r) for r in rows}) == 1
    idx = torch.tensor(rows)
    targets = torch.randint(3, vocab, idx.shape, generator=g)
    targets[0, 3] = targets[-1, -2] = -100
    return idx, targets, doc_positions(idx, eos)


def run_alone(model, idx, targets, positions, **kwargs):
    """Logits of every segment run alone through the model (no positions), concatenated back into (B, T, vocab),
    and the mean loss over the scored targets: Σ each segment's loss × its scored targets / all scored targets."""
    rows, nll, count = [], 0.0, 0
    for r in range(idx.shape[0]):
        starts = torch.nonzero(positions[r] == 0).flatten().tolist() + [idx.shape[1]]
        parts = []
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            logits, loss = model(idx[r:r + 1, s:e], targets[r:r + 1, s:e], **kwargs)
            n = int((targets[r, s:e] >= 0).sum())
            if n:
                nll, count = nll + loss * n, count + n
            parts.append(logits)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows), nll / count


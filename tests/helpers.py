"""Helpers the test modules share (fixtures built on them live in conftest.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from geb.config import ModelConfig
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

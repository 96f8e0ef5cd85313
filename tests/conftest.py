"""Fixtures shared by the test modules: one thread for tiny models, one tokenizer, one briefly trained tiny run."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import corpus_text, small_config, train_tiny

from geb.checkpoint import load_model, save_checkpoint
from geb.config import ModelConfig
from geb.files import file_sha256
from geb.model import GEB
from geb.tokenizer import Tokenizer, train_tokenizer

TINY_STEPS = 60


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a busy 2-core box two OpenMP threads run 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small bilingual byte-fallback SentencePiece model (vocab 512) trained on the committed fixtures."""
    return train_tokenizer([corpus_text()], tmp_path_factory.mktemp("tok") / "tok", 512, num_threads=1)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file) -> Tokenizer:
    """The Tokenizer of tokenizer_file."""
    return Tokenizer(tokenizer_file)


@dataclass(frozen=True)
class TinyRun:
    """A run directory as train.py writes it (ckpt-*.pt with the tokenizer's sha256, tokenizer.model)."""

    run_dir: Path
    tokenizer_file: Path
    config: ModelConfig


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer_file, tokenizer) -> TinyRun:
    """One tiny model trained for TINY_STEPS steps on the fixtures, saved once per test session; reuse it rather
    than training another (load a fresh copy per test with tiny_model)."""
    config = small_config(vocab_size=tokenizer.vocab_size, d_model=96, ffn_dim=256, max_seq_len=128)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_tiny(tokenizer.encode(corpus_text()), config, steps=TINY_STEPS)
    finally:
        torch.set_num_threads(n)
    run_dir = tmp_path_factory.mktemp("tiny_run")
    state = {"model": model.state_dict(), "model_config": config.to_dict(), "step": TINY_STEPS,
             "tokenizer_sha256": file_sha256(tokenizer_file), "data_dir": None}
    save_checkpoint(run_dir, TINY_STEPS, state)
    shutil.copyfile(tokenizer_file, run_dir / "tokenizer.model")
    return TinyRun(run_dir, run_dir / "tokenizer.model", config)


@pytest.fixture
def tiny_model(tiny_run) -> GEB:
    """A fresh copy (eval mode, impl="torch") of the session's trained tiny model: a test may change it freely."""
    model, _ = load_model(tiny_run.run_dir, impl="torch")
    return model.eval()

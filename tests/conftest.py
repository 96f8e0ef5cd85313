"""Fixtures shared by the test modules."""

import json
from pathlib import Path

import pytest
import torch

CORPUS = Path(__file__).parent / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a busy 2-core box two OpenMP threads run 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small bilingual SentencePiece model (vocab 500) trained on the committed English and Chinese fixtures."""
    from geb.tokenizer import train_tokenizer

    text = (CORPUS / "macbeth_act1.txt").read_text(encoding="utf-8")[:20000]
    zh = "\n".join(json.loads(line)["text"] for line in (CORPUS / "news_zh.jsonl").read_text().splitlines())
    return train_tokenizer([text, zh[:10000]], tmp_path_factory.mktemp("tok") / "tok", 500, num_threads=1)

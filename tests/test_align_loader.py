"""geb.align_loader: packed SFT batches (no example split, positions restart, targets only on assistant tokens,
truncation counted), preference rows, exact resume, rank disjointness and the one-pass eval batches."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import WORDS

from geb.align_loader import (
    PreferenceLoader,
    SFTLoader,
    pack_rows,
    preference_eval_batches,
    read_align_manifest,
    sft_eval_batches,
)
from geb.chat import IGNORE_INDEX, encode_chat, encode_preference
from geb.corpus import DataError
from geb.data import prepare_aligned
from geb.loader import TokenLoader

SEQ = 96


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tokenizer_file):
    """60 conversations, a few longer than SEQ tokens, one shard per ~600 tokens."""
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("chat")
    rows = [{"messages": [{"role": "user", "content": _words(rng, 1, 6)},
                          {"role": "assistant", "content": _words(rng, 1, 30 if i % 9 == 0 else 6)}]}
            for i in range(60)]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_aligned(d / "out", "chat", [d / "in.jsonl"], tokenizer_file, val_fraction=0.1, shard_tokens=600)
    return d / "out", rows


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory, tokenizer_file):
    rng = random.Random(2)
    d = tmp_path_factory.mktemp("pref")
    rows = [{"prompt": _words(rng, 1, 40 if i % 7 == 0 else 6), "chosen": _words(rng, 1, 4),
             "rejected": _words(rng, 1, 4)} for i in range(40)]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_aligned(d / "out", "preference", [d / "in.jsonl"], tokenizer_file, val_fraction=0.1, shard_tokens=500)
    return d / "out", rows


def _examples_of(inputs, targets, positions):
    """Split packed rows back into examples at each position 0: (inputs, targets) per example."""
    out = []
    for x, y, p in zip(inputs.tolist(), targets.tolist(), positions.tolist(), strict=True):
        starts = [i for i, v in enumerate(p) if v == 0] + [len(p)]
        for a, b in zip(starts, starts[1:], strict=False):
            assert p[a:b] == list(range(b - a))  # positions restart at 0 and count up within each example
            out.append((x[a:b], y[a:b]))
    return out


def test_sft_batches_pack_whole_examples(chat_dir, tokenizer):
    d, rows = chat_dir
    assert len(read_align_manifest(d, "chat")["splits"]["train"]["shards"]) > 1
    encoded = {}
    for r in rows:
        ids, mask = encode_chat(r["messages"], tokenizer)
        encoded[tuple(ids[:SEQ])] = (ids, mask)
    loader = SFTLoader(d, "train", SEQ, 3, seed=random.randrange(100))
    seen = 0
    for _ in range(12):
        x, y, p = next(loader)
        assert x.shape == y.shape == p.shape == (3, SEQ) and x.dtype == torch.int64
        for xs, ys in _examples_of(x, y, p):
            if all(t == IGNORE_INDEX for t in ys) and tuple(xs) not in encoded:
                continue  # padding at the end of a row
            key = next(k for k in encoded if list(k[:len(xs)]) == xs)  # the row holds one whole example here
            ids, mask = encoded[key]
            k = min(len(ids) - 1, SEQ)
            assert xs == ids[:k]  # never split: the example starts at position 0 and runs to its end (or cut)
            assert ys == [t if m else IGNORE_INDEX for t, m in zip(ids[1:k + 1], mask[1:k + 1], strict=True)]
            seen += 1
    assert seen > 20
    long = sum(len(encode_chat(r["messages"], tokenizer)[0]) - 1 > SEQ for r in rows)
    for _ in range(len(rows)):  # within an epoch every example comes, the long ones too
        if loader.truncated:
            break
        next(loader)
    assert long > 0 and loader.truncated > 0


def test_pack_rows_never_splits():
    rng = np.random.default_rng()
    slots = rng.integers(1, 30, 200)
    rows, end = pack_rows(slots, rng.permutation(200), 5, 8, 32)
    assert len(rows) == 8 and all(sum(min(slots[i], 32) for i in r) <= 32 for r in rows)
    flat = [i for r in rows for i in r]
    assert len(flat) == len(set(flat)) == end - 5
    assert pack_rows(slots, np.arange(200), 198, 8, 32) is None  # the epoch's tail cannot start 8 rows


def test_sft_resume_and_ranks(chat_dir):
    d, _ = chat_dir
    a = SFTLoader(d, "train", SEQ, 2, world_size=1, seed=3)
    ref = [next(a) for _ in range(20)]  # crosses an epoch boundary
    b = SFTLoader(d, "train", SEQ, 2, seed=3)
    for _ in range(4):
        next(b)
    state = b.state_dict()
    c = SFTLoader(d, "train", SEQ, 2, seed=3)
    c.load_state_dict(state)
    for want in ref[4:]:
        got = next(c)
        assert all(torch.equal(u, v) for u, v in zip(got, want, strict=True))
    assert c.truncated == a.truncated and a.epoch >= 1
    # two ranks with batch 1 each see exactly the rows one rank with batch 2 sees, split between them
    r0, r1 = (SFTLoader(d, "train", SEQ, 1, rank=r, world_size=2, seed=3) for r in (0, 1))
    for want in ref[:3]:
        x0, x1 = next(r0), next(r1)
        assert torch.equal(torch.cat([x0[0], x1[0]]), want[0]) and torch.equal(torch.cat([x0[1], x1[1]]), want[1])
    with pytest.raises(DataError, match="seed"):
        SFTLoader(d, "train", SEQ, 2, seed=4).load_state_dict(state)


def test_sft_eval_covers_every_example_once(chat_dir):
    d, _ = chat_dir
    m = read_align_manifest(d, "chat")
    n = [0, 0]
    for r in range(2):
        for x, y, p in sft_eval_batches(d, "val", SEQ, 2, rank=r, world_size=2):
            n[r] += 1
            n_examples = sum(1 for xs, ys in _examples_of(x, y, p) if any(t != IGNORE_INDEX for t in ys))
            n.append(n_examples)
    assert n[0] == n[1] >= 1  # every rank the same number of batches
    assert sum(n[2:]) == m["splits"]["val"]["examples"]


def test_preference_batches(pref_dir, tokenizer):
    d, rows = pref_dir
    loader = PreferenceLoader(d, "train", SEQ, 2, seed=5)
    by_chosen = {}
    for r in rows:
        p, c, rj = encode_preference(r["prompt"], r["chosen"], r["rejected"], tokenizer)
        by_chosen.setdefault(tuple(c), []).append((p, c, rj))
    cut = 0
    for _ in range(10):
        x, y = next(loader)
        assert x.shape == y.shape == (4, SEQ)
        for k in range(2):
            chosen = [t for t in y[k].tolist() if t != IGNORE_INDEX]
            rejected = [t for t in y[2 + k].tolist() if t != IGNORE_INDEX]
            p, c, rj = next(e for e in by_chosen[tuple(chosen)] if e[2] == rejected)
            for row, resp in ((k, c), (2 + k, rj)):
                n = len(p) + len(resp) - 1
                if n <= SEQ:
                    assert x[row, :n].tolist() == (p + resp)[:-1]
                else:  # cut: the prompt keeps its end, right before the response
                    cut += 1
                    assert x[row, :SEQ + 1 - len(resp)].tolist() == p[-(SEQ + 1 - len(resp)):]
    assert cut > 0
    state = loader.state_dict()
    want = [next(loader) for _ in range(25)]
    again = PreferenceLoader(d, "train", SEQ, 2, seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, [next(again) for _ in
                                                                                          range(25)], strict=True))
    assert loader.truncated == again.truncated > 0
    r1 = PreferenceLoader(d, "train", SEQ, 1, rank=1, world_size=2, seed=5)
    r1.load_state_dict(state)
    assert torch.equal(next(r1)[0], torch.cat([want[0][0][1:2], want[0][0][3:4]]))
    total = sum(n for r in range(2) for _, _, n in preference_eval_batches(d, "val", SEQ, 3, rank=r, world_size=2))
    assert total == read_align_manifest(d, "preference")["splits"]["val"]["examples"]


def test_pretraining_loader_refuses_chat_dir(chat_dir, pref_dir):
    with pytest.raises(DataError, match="format 'geb-chat-v1', expected 'geb-tokens-v1'"):
        TokenLoader(chat_dir[0], "train", 16, 1)
    with pytest.raises(DataError, match="expected 'geb-chat-v1'"):
        SFTLoader(pref_dir[0], "train", 16, 1)

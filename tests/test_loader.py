"""geb.loader: the manifest check (a clear error naming the file for every bad directory), the training loader's
contract (disjoint, deterministic, exactly resumable, complete, zero-copy) and eval windows."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import CORPUS

import geb.loader
from geb.corpus import DataError
from geb.data import prepare, write_token_dir
from geb.loader import (
    IGNORE_INDEX,
    TokenLoader,
    doc_positions,
    iter_eval_windows,
    read_manifest,
    segments,
    split_bytes,
    token_dtype,
)
from geb.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_file) -> Path:
    """The fixture corpus prepared with the shared tokenizer: several train shards, one or more val shards."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(out, [CORPUS], tokenizer=tokenizer_file, shard_tokens=20_000, val_fraction=0.05, num_workers=1)
    return out


def shard_tokens(d: Path, split: str) -> np.ndarray:
    """A split's tokens read with pyarrow directly (not through the loader)."""
    m = json.loads((d / "manifest.json").read_text())
    arrays = [pa.ipc.open_file(d / e["file"]).read_all().column("tokens").to_numpy() for e in
              m["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# --- bad data directories ---------------------------------------------------------------------------------------------


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(prepared, d)
    return d


def test_missing_and_corrupt_manifest(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: corrupt manifest"):
        read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": geb.loader.FORMAT}))
    with pytest.raises(DataError, match=r"manifest\.json: corrupt manifest \(missing or bad field"):
        read_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json: missing \(build it with `python -m geb.data prepare"):
        TokenLoader(copy, "train", 8, 2)


def test_truncated_shard_detected_before_training(copy):
    shard = copy / "train-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-00001\.arrow: shard is \d+ bytes, manifest says \d+ \(truncated"):
        read_manifest(copy)
    with pytest.raises(DataError, match=r"train-00001\.arrow"):
        TokenLoader(copy, "train", 8, 2)
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00001\.arrow: shard missing"):
        read_manifest(copy)


def test_corrupt_shard_same_size(copy):
    shard = copy / "train-00000.arrow"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    read_manifest(copy)  # sizes match: the cheap check passes ...
    with pytest.raises(DataError, match=r"train-00000\.arrow: corrupt shard"):
        read_manifest(copy, verify=True)  # ... the full one does not
    loader = TokenLoader(copy, "train", 8, 2)
    with pytest.raises(DataError, match=r"train-00000\.arrow: corrupt shard"):
        for _ in range(loader.steps_per_epoch):  # and the loader fails when it maps the shard
            next(loader)


def test_token_count_mismatch(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["tokens"] += 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="token counts do not add up"):
        read_manifest(copy)
    m["splits"]["train"]["tokens"] += 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"train-00000\.arrow: holds \d+ uint16 tokens, manifest says"):
        read_manifest(copy, verify=True)


def test_tokenizer_mismatch_and_vocab_too_large(copy, tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.model: tokenizer vocab_size \d+ is larger than the model's"):
        read_manifest(copy, model_vocab_size=100)
    other = train_tokenizer([(CORPUS / "macbeth_act1.txt").read_text()], tmp_path / "other", 300, num_threads=1)
    shutil.copyfile(other, copy / "tokenizer.model")
    with pytest.raises(DataError, match=r"tokenizer\.model: sha256 .* does not match the manifest"):
        read_manifest(copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.model: tokenizer missing"):
        read_manifest(copy)


# --- loader -----------------------------------------------------------------------------------------------------------

SIZES = [997, 1, 4000, 37, 2500, 1465]  # irregular shards: windows straddle shard boundaries
N = sum(SIZES)


@pytest.fixture(scope="module")
def positions(tmp_path_factory, tokenizer_file) -> Path:
    """A data dir whose token at global position p is p (vocab claimed 65536), so a window names itself."""
    d = tmp_path_factory.mktemp("positions")
    starts = np.cumsum([0, *SIZES])
    train = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    write_token_dir(d, tokenizer_file, {"train": train, "val": [np.arange(500)]}, vocab_size=65536)
    return d


def starts_of(batch) -> list[int]:
    x, y = batch
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    assert torch.equal(x[:, 1:], y[:, :-1])
    T = x.shape[1]
    for row in x:  # contiguous positions, even across shard boundaries
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + T))
    return [int(r[0]) for r in x]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_disjoint_and_epoch_complete(positions, world_size):
    T, B = 16, 3
    loaders = [TokenLoader(positions, "train", T, B, rank=r, world_size=world_size, seed=7) for r in range(world_size)]
    n_windows = (N - 1) // T
    steps = n_windows // (B * world_size)
    assert loaders[0].steps_per_epoch == steps and loaders[0].tokens_per_epoch == steps * B * world_size * T
    for epoch in range(2):
        seen = []
        for _ in range(steps):
            for ld in loaders:
                seen += starts_of(next(ld))
        assert all(ld.epoch == epoch for ld in loaders)
        assert len(seen) == len(set(seen)) == steps * B * world_size  # disjoint across ranks and steps
        assert set(seen) <= set(range(0, n_windows * T, T))  # every window on the stride-T grid
    next(loaders[0])
    assert loaders[0].epoch == 2


def test_full_coverage_when_batches_divide(positions):
    T = 16
    n_windows = (N - 1) // T  # 562 = 2 * 281
    ld = TokenLoader(positions, "train", T, 281)
    targets = torch.cat([next(ld)[1].flatten() for _ in range(2)])
    assert sorted(targets.tolist()) == list(range(1, n_windows * T + 1))  # every token a target exactly once


def test_determinism(positions):
    def run(seed, n=40):
        ld = TokenLoader(positions, "train", 16, 4, seed=seed)
        return [starts_of(next(ld)) for _ in range(n)]

    a = run(0)
    assert a == run(0) and a != run(1)
    ld = TokenLoader(positions, "train", 16, 4, seed=0)
    e0 = [starts_of(next(ld)) for _ in range(ld.steps_per_epoch)]
    e1 = [starts_of(next(ld)) for _ in range(ld.steps_per_epoch)]
    assert e0 != e1  # reshuffled every epoch


@pytest.mark.parametrize("k", [0, 5, 34, 36])  # 35 steps per epoch: also resume at and across the epoch boundary
def test_exact_resume(positions, k):
    a = TokenLoader(positions, "train", 16, 16, seed=3)
    assert a.steps_per_epoch == 35
    for _ in range(k):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives serialization
    b = TokenLoader(positions, "train", 16, 16, seed=3)
    b.load_state_dict(state)
    for _ in range(50):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (a.epoch, a.position) == (b.epoch, b.position)


def test_resume_with_other_world_size_reshards_exactly(positions):
    T, B = 16, 2
    ref = TokenLoader(positions, "train", T, 1, seed=5)
    order = [starts_of(next(ref))[0] for _ in range(40)]  # the global window order
    two = [TokenLoader(positions, "train", T, B, rank=r, world_size=2, seed=5) for r in range(2)]
    consumed = []
    for _ in range(3):
        for ld in two:
            consumed += starts_of(next(ld))
    assert consumed == order[:12]
    state = two[1].state_dict()
    assert state == {**two[0].state_dict(), "world_size": 2}
    four = [TokenLoader(positions, "train", T, B, rank=r, world_size=4, seed=5) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    nxt = []
    for ld in four:
        nxt += starts_of(next(ld))
    assert nxt == order[12:20]


def test_resume_refuses_other_data_or_seed(positions, prepared):
    state = TokenLoader(positions, "train", 16, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1 but this loader has seed=2"):
        TokenLoader(positions, "train", 16, 2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(positions, "train", 8, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="n_tokens"):
        TokenLoader(prepared, "train", 16, 2, seed=1).load_state_dict(state)


def test_loader_errors(positions):
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(positions, "val", 16, 32)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenLoader(positions, "test", 16, 2)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(positions, "train", 16, 2, rank=2, world_size=2)


def test_zero_copy_and_lazy_open(positions):
    pa_before = pa.total_allocated_bytes()
    ld = TokenLoader(positions, "train", 16, 4)
    assert not ld._shards._open  # nothing mapped up front
    for _ in range(20):
        next(ld)
    arr = ld._shards.shard(2)
    assert not arr.flags.owndata and not arr.flags.writeable  # a view of the read-only memory map
    assert pa.total_allocated_bytes() == pa_before  # Arrow allocated nothing: no shard was read into memory


def _rss() -> int:
    """Anonymous resident memory: a copy of a shard lands here, mapped file pages (and their readahead) do not."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_rss_does_not_grow_by_shard_size(tmp_path, tokenizer_file):
    n = 48 << 20  # 96 MB uint16 shard
    write_token_dir(tmp_path, tokenizer_file, {"train": [np.zeros(n, np.uint16)]})
    base = _rss()
    ld = TokenLoader(tmp_path, "train", 256, 8)
    for _ in range(50):
        next(ld)
    assert _rss() - base < 24 << 20  # a copy would add 96 MB (or 384 MB as int64)


def test_many_shards_open_lazily_with_bounded_maps(tmp_path, tokenizer_file, monkeypatch):
    write_token_dir(tmp_path, tokenizer_file, {"train": [np.arange(i * 40, i * 40 + 40) for i in range(300)]},
                    vocab_size=65536)
    t0 = time.perf_counter()
    ld = TokenLoader(tmp_path, "train", 8, 4)
    assert time.perf_counter() - t0 < 2.0 and not ld._shards._open
    monkeypatch.setattr(geb.loader, "_MAX_OPEN_SHARDS", 4)
    for _ in range(ld.steps_per_epoch):
        starts_of(next(ld))
        assert len(ld._shards._open) <= 5


# --- eval windows -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, batch_size", [(16, 4), (64, 7), (1, 3), (10_000, 2)])
def test_eval_windows_score_every_token_once(prepared, seq_len, batch_size):
    m = read_manifest(prepared)
    toks = shard_tokens(prepared, "val").astype(np.int64)
    xs, ys = [], []
    for x, y in iter_eval_windows(prepared, "val", seq_len, batch_size):
        assert x.shape == y.shape and x.shape[1] == seq_len and x.shape[0] <= batch_size
        xs.append(x.flatten())
        ys.append(y.flatten())
    y = torch.cat(ys)
    scored = y[y != IGNORE_INDEX]
    assert scored.tolist() == toks.tolist()  # every token exactly once, in order
    assert torch.cat(xs)[0] == m["tokenizer"]["eos_id"]
    assert split_bytes(m, "val", len(scored)) == m["splits"]["val"]["bytes"]
    assert split_bytes(m, "val", len(scored) // 2) == pytest.approx(m["splits"]["val"]["bytes"] * (len(scored) // 2)
                                                                   / len(scored))


def test_eval_windows_ranks_partition(prepared):
    full = [y for _, y in iter_eval_windows(prepared, "train", 32, 4)]
    parts = [[y for _, y in iter_eval_windows(prepared, "train", 32, 4, rank=r, world_size=3)] for r in range(3)]
    assert sum(len(p) for p in parts) == len(full)
    for i, y in enumerate(full):
        assert torch.equal(parts[i % 3][i // 3], y)




def test_eval_windows_single_row_last_batch_keeps_inputs_valid(prepared):
    m = read_manifest(prepared)
    n = m["splits"]["val"]["tokens"]
    seq_len, batch_size = 8, 2
    n_windows = -(-n // seq_len)
    if n_windows % batch_size != 1:  # make the last batch hold exactly one row
        seq_len = next(t for t in range(5, 64) if (-(-n // t)) % batch_size == 1)
    batches = list(iter_eval_windows(prepared, "val", seq_len, batch_size))
    assert batches[-1][0].shape[0] == 1
    for inputs, targets in batches:
        assert int(inputs.min()) >= 0  # padding targets (-100) must never leak into inputs
        assert (targets != IGNORE_INDEX).sum() > 0


# --- document masking -------------------------------------------------------------------------------------------------

EOS = 2  # the shared tokenizer's fixed eos id


@pytest.fixture(scope="module")
def documents(tmp_path_factory, tokenizer_file) -> Path:
    """A data dir of documents whose every token is 100 + the document's index, each followed by EOS."""
    rng = np.random.default_rng(0)
    docs = [np.full(int(n), 100 + i) for i, n in enumerate(rng.integers(1, 40, size=300))]
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    d = tmp_path_factory.mktemp("documents")
    write_token_dir(d, tokenizer_file, {"train": [stream[:3000], stream[3000:]], "val": [stream[:700]]},
                    vocab_size=65536)
    return d


def _check_segments(x, y, pos):
    """Each segment starts at a row start or an EOS input, and all its inputs after that and all its targets
    (EOS aside) come from one document: nothing is predicted from the previous document."""
    assert pos.shape == x.shape and pos.dtype == torch.int64
    for row_x, row_y, row_p in zip(x.tolist(), y.tolist(), pos.tolist(), strict=True):
        start = 0
        for i, p in enumerate(row_p):
            if i == 0 or row_x[i] == EOS:
                start = i
            assert p == i - start, (i, row_p)
        cu, _ = segments(torch.tensor([row_p]))
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            scored = [i for i in range(a, b) if row_y[i] != IGNORE_INDEX]  # padded tails are not scored
            docs = {t for i in scored for t in (row_x[i], row_y[i]) if t != EOS}
            assert len(docs) <= 1, f"segment {a}:{b} mixes documents {docs}"


def test_doc_mask_positions_restart_at_each_document(documents):
    plain = TokenLoader(documents, "train", 64, 4, seed=1)
    masked = TokenLoader(documents, "train", 64, 4, seed=1, doc_mask=True)
    for _ in range(10):
        x, y = next(plain)
        xm, ym, pos = next(masked)
        assert torch.equal(x, xm) and torch.equal(y, ym)  # same windows in the same order
        assert (x == EOS).any()
        _check_segments(xm, ym, pos)


def test_doc_mask_resume_is_exact(documents):
    a = TokenLoader(documents, "train", 32, 3, seed=4, doc_mask=True)
    for _ in range(7):
        next(a)
    b = TokenLoader(documents, "train", 32, 3, seed=4, doc_mask=True)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(20):
        for ta, tb in zip(next(a), next(b), strict=True):
            assert torch.equal(ta, tb)


def test_doc_mask_eval_windows_score_each_document_alone(documents):
    batches = list(iter_eval_windows(documents, "val", 48, 3, doc_mask=True))
    plain = list(iter_eval_windows(documents, "val", 48, 3))
    assert len(batches) == len(plain)
    for (x, y, pos), (xp, yp) in zip(batches, plain, strict=True):
        assert torch.equal(x, xp) and torch.equal(y, yp)
        _check_segments(x, y, pos)


def test_segments_are_varlen_cumulative_lengths():
    x = torch.tensor([[5, 6, EOS, 7, 8, EOS, EOS, 9], [EOS, 1, 1, 1, EOS, 3, 3, 3]])
    pos = doc_positions(x, EOS)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]]
    cu, longest = segments(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 6, 8, 12, 16] and longest == 4
    with pytest.raises(ValueError, match="positions must be 0"):
        segments(pos[:, 1:])
    with pytest.raises(ValueError, match="positions must be 0"):  # a segment would run on into the next row
        segments(torch.cat([pos[:1], pos[1:].roll(1, -1)]))

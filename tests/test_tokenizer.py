"""geb.tokenizer: exact round trips (English, Chinese, emoji, invalid bytes), fixed special ids, streaming decode."""

import json
from pathlib import Path

import pytest

from geb.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

CORPUS = Path(__file__).parent / "fixtures" / "corpus"

SAMPLES = [
    "In the beginning God created the heaven and the earth.",
    "When shall we three meet again\nIn thunder, lightning, or in rain?\n",
    "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）",
    "质量还不错，内容只适合边上厕所便消遣了",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇨🇳🇬🇧",
    "  leading spaces,\ttabs,\r\nCRLF and trailing   \n\n\n",
    "digits 1234567890 ３１日 and rare chars 𠀀 龘 Ω ∮ ĳ",
    b"invalid \xff\xfe bytes \xe4\xb8 cut".decode("utf-8", errors="replace"),
    "",
    " ",
    "\x00\x01 control",
]


def _texts() -> list[str]:
    out = []
    for p in sorted(CORPUS.iterdir()):
        if p.suffix == ".jsonl":
            out += [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines()]
        else:
            out.append(p.read_text(encoding="utf-8"))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tokenizer(_texts(), tmp_path_factory.mktemp("tok") / "t", 700))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback: never unknown


def test_round_trip_whole_fixture(tok):
    for text in _texts():
        assert tok.decode(tok.encode(text)) == text


def test_chunks_concatenate_exactly(tok):
    # No dummy prefix: encoding a text in pieces and concatenating the ids decodes to the whole text.
    text = SAMPLES[1] + SAMPLES[2] + SAMPLES[4]
    ids = tok.encode(text[:17]) + tok.encode(text[17:40]) + tok.encode(text[40:])
    assert tok.decode(ids) == text


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    ids = tok.encode("abc", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tok.decode(ids) == "abc"
    assert tok.decode([PAD_ID, *tok.encode("x"), PAD_ID]) == "x"
    assert tok.vocab_size <= 700


def test_digits_split(tok):
    pieces = tok.sp.encode("2024 12345", out_type=str)
    assert all(len(p.strip("\u2581")) <= 1 for p in pieces if any(c.isdigit() for c in p))


def test_sha256_and_path(tok):
    import hashlib

    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert tok.path.name == "t.model"


def test_invalid_byte_sequences_decode_without_error(tok):
    byte_ids = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xE4, 0xB8)]  # first 2 bytes of a 3-byte char
    assert tok.decode(byte_ids + tok.encode("ok")).endswith("ok")
    dec = tok.stream_decoder()
    out = "".join(dec.push(i) for i in byte_ids + tok.encode("ok")) + dec.flush()
    assert out.endswith("ok") and "\ufffd" in out


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_decoder(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    dec = tok.stream_decoder()
    parts = [dec.push(i) for i in ids]
    assert "".join(parts) + dec.flush() == tok.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in parts)  # never a half character


def test_stream_decoder_byte_fallback_chinese(tok):
    text = "龘𠀀🙂"  # outside this tiny vocab: spelled as UTF-8 bytes, one token each
    ids = tok.encode(text)
    assert len(ids) > len(text)
    dec = tok.stream_decoder()
    parts = [dec.push(i) for i in ids]
    assert [p for p in parts if p] == list(text)


def test_train_from_files(tmp_path):
    path = train_tokenizer([CORPUS / "macbeth_act1.txt"], tmp_path / "m", 400)
    t = Tokenizer(path)
    assert path == tmp_path / "m.model" and t.vocab_size <= 400
    assert t.decode(t.encode("Fair is foul, and foul is fair")) == "Fair is foul, and foul is fair"
    assert [f.name for f in tmp_path.iterdir()] == ["m.model"]  # no temp files left
    again = train_tokenizer([CORPUS / "macbeth_act1.txt"], tmp_path / "elsewhere" / "m", 400)
    assert Tokenizer(again).sha256 == t.sha256  # deterministic, whatever the output path


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], tmp_path / "x", 400)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "x", 100)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")

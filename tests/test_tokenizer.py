"""geb.tokenizer: exact round trips (English, Chinese, emoji, invalid bytes), fixed special ids, streaming decode."""

import hashlib
import json

import pytest
from helpers import CORPUS

from geb.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

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


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback: never unknown


def test_round_trip_whole_fixture(tokenizer):
    for text in _texts():
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chunks_concatenate_exactly(tokenizer):
    # No dummy prefix: encoding a text in pieces and concatenating the ids decodes to the whole text.
    text = SAMPLES[1] + SAMPLES[2] + SAMPLES[4]
    ids = tokenizer.encode(text[:17]) + tokenizer.encode(text[17:40]) + tokenizer.encode(text[40:])
    assert tokenizer.decode(ids) == text


def test_special_ids(tokenizer):
    ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)
    assert ids == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    ids = tokenizer.encode("abc", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tokenizer.decode(ids) == "abc"
    assert tokenizer.decode([PAD_ID, *tokenizer.encode("x"), PAD_ID]) == "x"
    assert tokenizer.vocab_size <= 512


def test_digits_split(tmp_path):
    # Numbers all over the training text (the shared fixture tokenizer has too few to learn digit pieces): BPE
    # would merge them into multi-digit pieces without split_digits.
    text = "\n".join(f"{n} {n * 7} {n % 97}" for n in range(1000, 4000))
    tok = Tokenizer(train_tokenizer([text], tmp_path / "digits", 300, num_threads=1))
    pieces = tok.sp.encode("2024 12345", out_type=str)
    assert [p.strip("\u2581") for p in pieces if any(c.isdigit() for c in p)] == list("202412345")


def test_sha256_and_path(tokenizer, tokenizer_file):
    assert tokenizer.sha256 == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    assert tokenizer.path == tokenizer_file


def test_invalid_byte_sequences_decode_without_error(tokenizer):
    byte_ids = [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xE4, 0xB8)]  # first 2 bytes of a 3-byte char
    assert tokenizer.decode(byte_ids + tokenizer.encode("ok")).endswith("ok")
    dec = tokenizer.stream_decoder()
    out = "".join(dec.push(i) for i in byte_ids + tokenizer.encode("ok")) + dec.flush()
    assert out.endswith("ok") and "\ufffd" in out


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_decoder(tokenizer, text):
    ids = tokenizer.encode(text, bos=True, eos=True)
    dec = tokenizer.stream_decoder()
    parts = [dec.push(i) for i in ids]
    assert "".join(parts) + dec.flush() == tokenizer.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in parts)  # never a half character


def test_stream_decoder_byte_fallback_chinese(tokenizer):
    text = "龘𠀀🙂"  # outside this tiny vocab: spelled as UTF-8 bytes, one token each
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)
    dec = tokenizer.stream_decoder()
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

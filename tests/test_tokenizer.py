"""Byte-level BPE wrapper: exact round trip, special tokens, atomic save, loading errors."""
import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from ryzen_llm.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer

WORDS = "the a model token batch learns quickly slowly over under data byte pair merge".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n))
    return [w.capitalize() + "." for w in words]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(sentences(2000), vocab_size=300)


ROUND_TRIP_TEXTS = [
    "",
    "the model learns.",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n",
    "héllo wörld — naïve café",
    "日本語のテキスト、中文文本",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷",
    "e\u0301 combining accent, zero\u200bwidth space",
    "مرحبا بالعالم",  # right-to-left
    "NUL \x00 and DEL \x7f bytes",
    f"literal {EOS_TOKEN} and {PAD_TOKEN} in text",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_random_code_points(tokenizer):
    rng = random.Random(1)
    # Every code point except the surrogates, which cannot be encoded as UTF-8.
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(50):
        text = "".join(chr(rng.choice(points)) for _ in range(rng.randint(1, 40)))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 300
    assert {tokenizer.eos_id, tokenizer.pad_id} == {0, 1}
    assert tokenizer.decode([tokenizer.eos_id]) == EOS_TOKEN
    # Text that spells a special token is encoded as text, never as the eos id itself.
    ids = tokenizer.encode(f"a {EOS_TOKEN} b {PAD_TOKEN}")
    assert tokenizer.eos_id not in ids and tokenizer.pad_id not in ids


def test_merges_compress_training_text(tokenizer):
    text = sentences(20, seed=99)[0]
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges learned, not just bytes
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_encode_batch_matches_encode(tokenizer):
    texts = ROUND_TRIP_TEXTS + sentences(5, seed=3)
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("bad", [0, 100, 257])
def test_vocab_size_too_small(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["some text"], vocab_size=bad)


def test_save_load_folder_and_file(tokenizer, tmp_path):
    written = tokenizer.save(tmp_path / "tok")
    assert written == tmp_path / "tok" / "tokenizer.json"
    assert [p.name for p in written.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    text = ROUND_TRIP_TEXTS[6] + sentences(1)[0]
    for path in (tmp_path / "tok", written):
        loaded = Tokenizer.load(path)
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert (loaded.eos_id, loaded.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
        # The "special-looking text is plain text" setting survives a reload.
        assert loaded.encode(EOS_TOKEN) != [tokenizer.eos_id]


def test_save_replaces_existing_file(tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text("old")
    tokenizer.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path).vocab_size == tokenizer.vocab_size


def test_load_missing_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a folder without tokenizer.json


@pytest.mark.parametrize("content", ["not json {", "{}", json.dumps({"model": "nonsense"})])
def test_load_corrupt_names_path(tmp_path, content):
    file = tmp_path / "broken.json"
    file.write_text(content)
    with pytest.raises(ValueError, match="broken.json"):
        Tokenizer.load(file)


def test_load_rejects_tokenizer_without_special_tokens(tmp_path):
    HFTokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer.load(tmp_path)

"""The SentencePiece backend behind the same Tokenizer interface: exact round trips, specials, save/load."""
import functools
import random

import pytest
import sentencepiece as spm

from lm import tokenizer
from lm.tokenizer import sentencepiece
from tests.test_tokenizer import FINEWEB, TRICKY, _fineweb


@functools.cache
def _trained(path) -> sentencepiece.SentencePieceTokenizer:
    return sentencepiece.train(_fineweb(path)[:60], 2000)


@pytest.fixture
def sp(shared_data):
    return _trained(shared_data(FINEWEB))


def test_ids_are_sentencepiece_ids_and_specials_are_reserved(sp):
    assert sp.n_vocab == 2000
    assert [sp.token_id(name) for name in tokenizer.SPECIAL_TOKENS] == list(range(1, 11))
    processor = spm.SentencePieceProcessor(model_proto=sp._proto)
    text = "Tokenizers split text into pieces."
    assert sp.encode(text) == processor.encode(text)
    assert sp.decode(sp.encode(text)) == processor.decode(processor.encode(text)) == text


def test_round_trips_exactly(sp, shared_data):
    rng = random.Random(0)
    texts = [t for t in TRICKY if "\ud800" not in t] + list(_fineweb(shared_data(FINEWEB))[-50:])
    texts += ["".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x24FF), rng.randint(0x1F300, 0x1FAFF),
                                      rng.randint(0x3000, 0x9FFF), rng.randint(0, 0x1F)]))
                      for _ in range(rng.randint(0, 60))) for _ in range(200)]
    for text in texts:
        assert sp.decode(sp.encode(text)) == text, repr(text)
    assert sp.encode_batch(texts, num_threads=2) == [sp.encode(t) for t in texts]


def test_the_one_known_lossy_character(sp):
    """SentencePiece writes spaces as U+2581, so a literal U+2581 in the input comes back as a space."""
    assert sp.decode(sp.encode("a\u2581b")) == "a b"


def test_special_tokens_only_when_allowed(sp):
    text = "<|user_start|>hi<|user_end|><|endoftext|>"
    assert not set(sp.encode(text)) & set(sp.special_tokens.values())
    ids = sp.encode(text, allowed_special={"<|user_start|>", "<|user_end|>"})
    assert ids[0] == sp.token_id("<|user_start|>") and sp.eot_id not in ids
    assert sp.decode(sp.encode(text, allowed_special="all")) == text
    assert sp.encode_batch([text], allowed_special="all") == [sp.encode(text, allowed_special="all")]


def test_stream_decoder_and_save_load(sp, tmp_path):
    text = "byte fallback: 𝄞 𓀀 ✓"
    decoder = sp.stream_decoder()
    assert "".join(decoder.feed(i) for i in sp.encode(text)) + decoder.flush() == text
    sp.save(tmp_path)
    loaded = tokenizer.load(tmp_path)
    assert isinstance(loaded, tokenizer.Tokenizer) and loaded.name == sp.name
    assert loaded.hash == sp.hash and loaded.special_tokens == sp.special_tokens
    assert loaded.encode(text) == sp.encode(text)
    assert tokenizer.load(tmp_path / sentencepiece.MODEL_FILE).encode(text) == sp.encode(text)


def test_train_command_line_with_sentencepiece_backend(shared_data, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "sp"
    result = subprocess.run([sys.executable, "-m", "lm.data.train_tokenizer", "--backend=sentencepiece",
                             f"--input={shared_data('web/text/c4_en_sample.01.json.gz')}", "--vocab_size=400",
                             f"--output={out}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = tokenizer.load(out)
    assert isinstance(loaded, sentencepiece.SentencePieceTokenizer) and loaded.n_vocab <= 400
    assert loaded.decode(loaded.encode("Sevenoaks mum, 37")) == "Sevenoaks mum, 37"

"""Training: rustbpe's merges equal the readable reference BPE's; trained vocabularies round-trip any text and export
to an HF tokenizer.json with identical ids; the command line reports what it read and dropped."""
import functools
import json
import random
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import pytest
import tokenizers

from lm import tokenizer
from lm.data import train_tokenizer
from lm.data.readers import iter_documents
from lm.tokenizer import encoding, huggingface, reference, train
from tests.conftest import shared_path
from tests.test_tokenizer import CL100K, FINEWEB, TRICKY, _fineweb

PATTERN = encoding.GPT4_PATTERN
N_SPECIAL = len(tokenizer.SPECIAL_TOKENS)
# HF treats special-token text in input as specials, and cannot take lone surrogates at all
HF_TRICKY = [text for text in TRICKY if "<|" not in text and "\ud800" not in text]


@functools.cache
def _texts(path, n_bytes: int) -> tuple[str, ...]:
    """The first FineWeb documents, about n_bytes of UTF-8 in all."""
    texts, size = [], 0
    for document in iter_documents(path):
        if size >= n_bytes:
            break
        texts.append(document.text)
        size += len(document.text.encode())
    return tuple(texts)


@functools.cache
def _trained(path, vocab_size: int) -> encoding.TiktokenTokenizer:
    return train.train(_texts(path, 1_000_000), vocab_size)


@pytest.fixture
def fineweb(shared_data):
    return shared_data(FINEWEB)


def test_naive_and_incremental_reference_trainers_agree(fineweb):
    texts = _texts(fineweb, 10_000)
    merges = reference.train_naive(texts, 256 + 300, PATTERN)
    assert len(merges) == 300
    assert reference.train(texts, 256 + 300, PATTERN) == merges


def test_rustbpe_merges_equal_reference_merges_on_100kb(fineweb):
    texts = _texts(fineweb, 100_000)
    assert sum(len(t.encode()) for t in texts) >= 100_000
    fast = train.train(texts, 2048 + N_SPECIAL)
    merges = reference.train(texts, 2048, PATTERN)
    assert len(merges) == 2048 - 256
    assert fast.mergeable_ranks == reference.merges_to_ranks(merges)
    # and the seed's encoder (earliest merge first) agrees with tiktoken's lowest-rank rule on these merges
    for text in texts[:5] + tuple(TRICKY[:12]):
        assert reference.encode(text, merges, PATTERN) == fast.encode(text)


def test_train_gives_exactly_vocab_size_with_specials_last(fineweb):
    tok = _trained(fineweb, 4096)
    assert tok.n_vocab == 4096 and len(tok.mergeable_ranks) == 4096 - N_SPECIAL
    assert [tok.token_id(name) for name in tokenizer.SPECIAL_TOKENS] == list(range(4096 - N_SPECIAL, 4096))
    assert tok.encode("<|endoftext|>", allowed_special="all") == [tok.eot_id]
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    with pytest.raises(ValueError, match="vocab_size=200"):
        train.train(["text"], 200)


def test_trained_vocab_round_trips_random_code_points_and_bytes(fineweb):
    tok = _trained(fineweb, 4096)
    rng = random.Random(0)
    planes = [(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF), (0, 0x20)]
    for _ in range(300):
        text = "".join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode_bytes(tok.encode(text)) == text.encode()
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))).decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(junk)) == junk


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(text=st.text())
def test_trained_vocab_round_trips_hypothesis_text(text):
    tok = _trained(shared_path(FINEWEB), 4096)   # hypothesis runs outside pytest's function-scoped fixtures
    valid = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")   # lone surrogates -> U+FFFD
    assert tok.decode(tok.encode(text)) == valid


def _hf_ids(hf: tokenizers.Tokenizer, texts) -> list[list[int]]:
    return [encoding.ids for encoding in hf.encode_batch(list(texts), add_special_tokens=False)]


def test_hf_tokenizer_json_gives_identical_ids(fineweb, tmp_path):
    tok = _trained(fineweb, 4096)
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / encoding.HF_FILE))
    texts = list(_fineweb(fineweb)[-300:]) + HF_TRICKY   # held out: training read the first ~1 MB
    assert _hf_ids(hf, texts) == tok.encode_batch(texts)
    assert hf.get_vocab_size() == tok.n_vocab
    for name, token_id in tok.special_tokens.items():
        assert hf.token_to_id(name) == token_id
    ids = tok.encode(texts[0])
    assert hf.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("vocabulary", [CL100K, "tokenizers/gpt2"])
def test_hf_export_of_published_vocabularies_gives_identical_ids(vocabulary, shared_data, fineweb):
    tok = tokenizer.load(shared_data(vocabulary))
    hf = huggingface.to_hf(tok)
    texts = list(_texts(fineweb, 400_000)) + HF_TRICKY
    assert _hf_ids(hf, texts) == tok.encode_batch(texts)
    for name, token_id in tok.special_tokens.items():
        assert hf.token_to_id(name) == token_id


def test_train_command_line_reports_dropped_and_replaced_documents(tmp_path, fineweb):
    corpus = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": text}).encode() for text in _texts(fineweb, 200_000)]
    lines = good[:5] + [b"{not json", json.dumps({"text": 7}).encode(), b'{"text": "bad \xff byte"}'] + good[5:]
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "notes.txt").write_text("a whole document in a text file\n")
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "lm.data.train_tokenizer", f"--input={corpus},{tmp_path}/*.txt",
                             "--vocab_size=1000", f"--output={out}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "documents_report.json").read_text())
    assert report["documents"] == len(good) + 2 and report["utf8_replaced"] == 1
    assert report["by_reason"] == {"malformed_json": 1, "missing_text": 1}
    assert [(r["line"], r["file"]) for r in report["dropped_examples"]] == [(6, str(corpus)), (7, str(corpus))]
    assert report["replaced_examples"] == [{"file": str(corpus), "line": 8}]
    assert f"{corpus}:8: invalid UTF-8 replaced" in result.stderr and f"{corpus}:6: dropped (malformed_json)" in result.stderr
    loaded = tokenizer.load(out)
    assert loaded.n_vocab == 1000 and loaded.hash == json.loads((out / "train_report.json").read_text())["hash"]
    assert loaded.decode(loaded.encode("bad \ufffd byte")) == "bad \ufffd byte"
    assert loaded.name == "bpe_1000"


def test_training_on_no_text_is_an_error_naming_the_inputs(tmp_path):
    with pytest.raises(train.EmptyCorpus, match="0 documents"):
        train.train([], 1000)
    with pytest.raises(train.EmptyCorpus, match="2 empty texts"):
        train.train(["", ""], 1000, backend="sentencepiece")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text"}\n{broken\n')
    with pytest.raises(ValueError, match=rf"no documents to train a tokenizer on in {bad}: .*missing_text: 1"):
        train_tokenizer.run([str(bad)], 1000, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("backend", ["bpe", "sentencepiece"])
def test_too_little_text_names_the_vocabulary_by_its_real_size(tmp_path, backend, caplog):
    texts = ["the theme then the thesis there", "a tiny corpus cannot fill a vocabulary"] * 10
    tok = train.train(texts, 4000, tmp_path, backend=backend)
    assert tok.n_vocab < 4000 and tok.name == f"{backend}_{tok.n_vocab}"
    shortfall = 4000 - tok.n_vocab
    assert f"{shortfall} short of vocab_size=4000" in caplog.text
    meta = json.loads((tmp_path / encoding.META_FILE).read_text())
    report = json.loads((tmp_path / train.TRAIN_REPORT).read_text())
    for saved in (meta["training"], report):
        assert saved["requested_vocab_size"] == 4000 and saved["n_vocab"] == tok.n_vocab
        assert saved["shortfall"] == shortfall and tok.name in saved["warning"]
    loaded = tokenizer.load(tmp_path)
    assert loaded.name == tok.name and loaded.encode(texts[0]) == tok.encode(texts[0])
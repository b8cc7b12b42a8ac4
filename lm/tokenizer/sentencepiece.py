"""SentencePiece BPE behind the same Tokenizer interface, for configs that choose it.

Trained for exact round trips: identity normalisation, no whitespace collapsing, no dummy prefix, byte fallback
for characters outside the vocabulary. One thing cannot round-trip: a literal U+2581 "▁" in the input, which
SentencePiece uses to stand for a space, decodes as a space.
"""
import functools
import hashlib
import io
import json
import pathlib
import re
from typing import Iterable

import sentencepiece as spm

from lm.tokenizer.base import SPECIAL_TOKENS, AllowedSpecial, Tokenizer
from lm.tokenizer.encoding import META_FILE

MODEL_FILE = "tokenizer.model"
_REPLACEMENT = "\ufffd".encode()


class SentencePieceTokenizer(Tokenizer):
    """Ids: 0 <unk>, then the special tokens (control symbols: never matched in text), 256 bytes, pieces."""

    def __init__(self, model_proto: bytes, name: str):
        self.name = name
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.special_tokens = {token: self._sp.piece_to_id(token) for token in SPECIAL_TOKENS
                               if self._sp.is_control(self._sp.piece_to_id(token))}
        self._bytes = [self._piece_bytes(i) for i in range(self._sp.vocab_size())]

    def _piece_bytes(self, i: int) -> bytes:
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i):
            return bytes([int(piece[1:-1], 16)])    # "<0xE2>"
        if self._sp.is_control(i):
            return piece.encode() if piece in self.special_tokens else b""
        if self._sp.is_unknown(i):
            return _REPLACEMENT
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        if not allowed_special:
            return self._sp.encode(text)
        allowed = sorted(self.allowed_set(allowed_special), key=len, reverse=True)
        parts = re.split("(" + "|".join(map(re.escape, allowed)) + ")", text)
        ids = []
        for i, part in enumerate(parts):   # odd positions are the special tokens split out
            ids.extend([self.special_tokens[part]] if i % 2 else self._sp.encode(part) if part else [])
        return ids

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = (),
                     num_threads: int = 8) -> list[list[int]]:
        if not allowed_special:
            return self._sp.encode(list(texts), num_threads=num_threads)
        return super().encode_batch(texts, allowed_special, num_threads)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    @property
    def n_vocab(self) -> int:
        return self._sp.vocab_size()

    @functools.cached_property
    def hash(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()

    def save(self, directory, meta: dict | None = None) -> None:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self._proto)
        meta = dict(name=self.name, backend="sentencepiece", special_tokens=self.special_tokens,
                    n_vocab=self.n_vocab, hash=self.hash, **(meta or {}))
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load(path) -> SentencePieceTokenizer:
    """A .model file; its name comes from a tokenizer.meta.json beside it, else the file name."""
    path = pathlib.Path(path)
    meta = path.parent / META_FILE
    name = json.loads(meta.read_text())["name"] if meta.is_file() else path.stem
    return SentencePieceTokenizer(path.read_bytes(), name)


def train(texts: Iterable[str], vocab_size: int, output_dir=None, *,
          name: str | None = None) -> SentencePieceTokenizer:
    """SentencePiece BPE with n_vocab <= vocab_size (unk, special tokens and the 256 byte pieces included), named
    sentencepiece_<n_vocab> by default. Texts must be valid UTF-8 strings: lm.tokenizer.train.train (backend
    "sentencepiece") cleans them, stops at max_chars, and reports a vocabulary smaller than asked."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, max_sentence_length=1 << 20,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, control_symbols=list(SPECIAL_TOKENS),
        minloglevel=2,
    )
    tokenizer = SentencePieceTokenizer(model.getvalue(), "sentencepiece")
    tokenizer.name = name or f"sentencepiece_{tokenizer.n_vocab}"
    if output_dir is not None:
        tokenizer.save(output_dir)
    return tokenizer

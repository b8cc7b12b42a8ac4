"""Tokenizers: `load(name_or_path)` gives the one `Tokenizer` type every stage uses.

Train with `lm.tokenizer.train.train(texts, vocab_size, output_dir)` (on files: `python -m lm.data.train_tokenizer`);
look inside with `python -m lm.tokenizer.show`.
"""
import json
import pathlib

from lm.tokenizer import encoding
from lm.tokenizer.base import CHAT_SPECIAL_TOKENS, ENDOFTEXT, SPECIAL_TOKENS, StreamDecoder, Tokenizer

SENTENCEPIECE_MODEL = "tokenizer.model"


def load(name_or_path) -> Tokenizer:
    """A trained vocabulary directory, a .tiktoken / sentencepiece .model file, a directory with GPT-2's
    encoder.json + vocab.bpe, or a published name (o200k_base, cl100k_base, p50k_base, gpt2 / r50k_base) found offline."""
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        return _load_directory(path)
    if path.is_file():
        if path.suffix == ".model":
            from lm.tokenizer import sentencepiece
            return sentencepiece.load(path)
        return encoding.load_tiktoken_file(path)
    name = str(name_or_path)
    if name in encoding.KNOWN or name in encoding.ALIASES:
        return encoding.load_known(name)
    raise FileNotFoundError(f"{name!r} is neither an existing path nor a known vocabulary "
                            f"({', '.join([*encoding.KNOWN, *encoding.ALIASES])})")


def _load_directory(path: pathlib.Path) -> Tokenizer:
    meta = path / encoding.META_FILE
    backend = json.loads(meta.read_text()).get("backend", "tiktoken") if meta.is_file() else None
    if backend == "sentencepiece" or (backend is None and (path / SENTENCEPIECE_MODEL).is_file()):
        from lm.tokenizer import sentencepiece
        return sentencepiece.load(path / SENTENCEPIECE_MODEL)
    if backend == "tiktoken":
        return encoding.load_directory(path)
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        return encoding.load_data_gym(path / "encoder.json", path / "vocab.bpe")
    raise FileNotFoundError(f"{path}: no tokenizer here (expected {encoding.META_FILE}, {SENTENCEPIECE_MODEL}, "
                            f"or encoder.json + vocab.bpe)")


__all__ = ["load", "Tokenizer", "StreamDecoder", "ENDOFTEXT", "CHAT_SPECIAL_TOKENS", "SPECIAL_TOKENS"]

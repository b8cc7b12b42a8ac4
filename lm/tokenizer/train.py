"""Train a byte-level BPE vocabulary on texts: GPT-4 regex pre-split, 256 byte tokens, merges, then special tokens.

    from lm.tokenizer import train
    tokenizer = train.train(texts, vocab_size=32768, output_dir="runs/tok")

Training takes texts (any iterable of str); reading them from files is lm.data's job:
`python -m lm.data.train_tokenizer --input=... --vocab_size=... --output=...` reads with lm.data.readers and calls this.
The texts stream through rustbpe (Rust, parallel chunk counting, incremental merges; it exports tiktoken ranks
directly), so any corpus size works in memory proportional to its distinct regex chunks. The result encodes with
tiktoken's core and is saved as tokenizer.tiktoken + tokenizer.meta.json + tokenizer.json (HF) + train_report.json.

No texts is an error. Too little text for the vocabulary asked for gives a smaller one, named by its real size
(bpe_<n_vocab>), with the shortfall in a warning, in tokenizer.meta.json ("training") and in train_report.json.
"""
import itertools
import json
import pathlib
import sys
import time
from typing import Iterable, Iterator

from absl import logging

from lm.tokenizer.base import SPECIAL_TOKENS, Tokenizer
from lm.tokenizer.encoding import GPT4_PATTERN, TiktokenTokenizer

TRAIN_REPORT = "train_report.json"


class EmptyCorpus(ValueError):
    """Training was given no text."""


class TextStream:
    """Passes texts through, skips empty ones, makes them valid UTF-8 for Rust, stops at max_chars, logs progress."""

    def __init__(self, texts: Iterable[str], max_chars: int = 0, log_every_s: float = 10.0):
        self._texts, self._max_chars, self._log_every_s = texts, max_chars, log_every_s
        self.documents = self.characters = self.replaced = self.empty = 0
        self._start = self._last_log = time.monotonic()

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if self._max_chars and self.characters >= self._max_chars:
                break
            if not text:
                self.empty += 1
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: Rust strings cannot hold them
                self.replaced += 1
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            self.documents += 1
            self.characters += len(text)
            if time.monotonic() - self._last_log > self._log_every_s:
                self._last_log = time.monotonic()
                logging.info("read %d documents, %.1fM characters (%.1fM chars/s)", self.documents,
                             self.characters / 1e6, self.characters / 1e6 / (self._last_log - self._start))
            yield text

    def non_empty(self) -> Iterator[str]:
        """The stream, after checking it has at least one text (EmptyCorpus otherwise)."""
        texts = iter(self)
        first = next(texts, None)
        if first is None:
            raise EmptyCorpus(f"no text to train a tokenizer on: 0 documents ({self.empty} empty texts)")
        return itertools.chain([first], texts)


def train(texts: Iterable[str], vocab_size: int, output_dir=None, *, backend: str = "bpe",
          pattern: str = GPT4_PATTERN, special_tokens: tuple[str, ...] = SPECIAL_TOKENS, name: str | None = None,
          max_chars: int = 0) -> Tokenizer:
    """Train on texts so that n_vocab == vocab_size (merges + special tokens) when the text allows it; save into
    output_dir if given.

    backend "bpe": rustbpe ranks encoded by tiktoken (a TiktokenTokenizer); "sentencepiece": SentencePiece BPE.
    """
    if backend not in ("bpe", "sentencepiece"):
        raise ValueError(f"backend={backend!r}: expected 'bpe' or 'sentencepiece'")
    stream = TextStream(texts, max_chars)
    start = time.monotonic()
    if backend == "sentencepiece":
        from lm.tokenizer import sentencepiece
        tokenizer = sentencepiece.train(stream.non_empty(), vocab_size, name=name)
    else:
        tokenizer = _train_bpe(stream, vocab_size, pattern, special_tokens, name)
    seconds = time.monotonic() - start
    logging.info("trained %s on %d documents (%.1fM characters) in %.1fs", tokenizer, stream.documents,
                 stream.characters / 1e6, seconds)
    report = dict(documents=stream.documents, characters=stream.characters, replaced_utf8=stream.replaced,
                  empty=stream.empty, requested_vocab_size=vocab_size, n_vocab=tokenizer.n_vocab,
                  shortfall=vocab_size - tokenizer.n_vocab, seconds=round(seconds, 3))
    if report["shortfall"] > 0:
        report["warning"] = (f"{stream.documents} documents ({stream.characters:,} characters) only support "
                             f"n_vocab={tokenizer.n_vocab}, {report['shortfall']} short of vocab_size={vocab_size}; "
                             f"the vocabulary is named {tokenizer.name}")
        logging.warning("%s", report["warning"])
    if output_dir is not None:
        tokenizer.save(output_dir, meta={"training": report})
        report["hash"] = tokenizer.hash
        (pathlib.Path(output_dir) / TRAIN_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return tokenizer


def _train_bpe(stream: TextStream, vocab_size: int, pattern: str, special_tokens, name) -> TiktokenTokenizer:
    import rustbpe
    n_ranks = vocab_size - len(special_tokens)
    if n_ranks < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {n_ranks} ids after {len(special_tokens)} special tokens; "
                         f"need at least 256 for the byte tokens")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(stream.non_empty(), vocab_size=n_ranks, pattern=pattern)
    ranks = _unique_ranks(trainer.get_mergeable_ranks())
    first_special = max(ranks.values()) + 1
    specials = {token: first_special + i for i, token in enumerate(special_tokens)}
    n_vocab = first_special + len(specials)
    return TiktokenTokenizer(name or f"bpe_{n_vocab}", ranks, pattern, specials)


def _unique_ranks(ranks: list[tuple[bytes, int]]) -> dict[bytes, int]:
    """rank list -> dict. BPE can, rarely, build the same bytes twice by different merges; tiktoken would only
    ever produce the lower rank, so the later one is dropped (its id stays unused)."""
    unique = {}
    for token, rank in ranks:
        if token in unique:
            logging.warning("merge %d rebuilds token %r (rank %d); dropping the duplicate", rank, token, unique[token])
            continue
        unique[bytes(token)] = rank
    return unique


if __name__ == "__main__":
    sys.exit("lm.tokenizer.train trains on texts and has no command line: to train on files, run "
             "python -m lm.data.train_tokenizer --input=... --vocab_size=... --output=...")

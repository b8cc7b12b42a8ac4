"""Train a byte-level BPE vocabulary: GPT-4 regex pre-split, 256 byte tokens, merges, then special tokens.

    python -m lm.tokenizer.train --input='corpus/*.jsonl.gz' --vocab_size=32768 --output=runs/tok

The corpus streams through rustbpe (Rust, parallel chunk counting, incremental merges; it exports tiktoken ranks
directly), so any corpus size works in memory proportional to its distinct regex chunks. The result encodes with
tiktoken's core and is saved as tokenizer.tiktoken + tokenizer.meta.json + tokenizer.json (HF).
"""
import json
import pathlib
import time
from typing import Iterable, Iterator

from absl import app, flags, logging

from lm.tokenizer.base import SPECIAL_TOKENS, Tokenizer
from lm.tokenizer.encoding import GPT4_PATTERN, TiktokenTokenizer

TRAIN_REPORT = "train_report.json"


class TextStream:
    """Passes texts through, makes them valid UTF-8 for Rust, stops at max_chars, and logs progress."""

    def __init__(self, texts: Iterable[str], max_chars: int = 0, log_every_s: float = 10.0):
        self._texts, self._max_chars, self._log_every_s = texts, max_chars, log_every_s
        self.documents = self.characters = self.replaced = 0
        self._start = self._last_log = time.monotonic()

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if self._max_chars and self.characters >= self._max_chars:
                break
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


def train(texts: Iterable[str], vocab_size: int, output_dir=None, *, backend: str = "bpe",
          pattern: str = GPT4_PATTERN, special_tokens: tuple[str, ...] = SPECIAL_TOKENS, name: str | None = None,
          max_chars: int = 0) -> Tokenizer:
    """Train on texts so that n_vocab == vocab_size (merges + special tokens); save into output_dir if given.

    backend "bpe": rustbpe ranks encoded by tiktoken (a TiktokenTokenizer); "sentencepiece": SentencePiece BPE.
    """
    if backend == "sentencepiece":
        from lm.tokenizer import sentencepiece
        return sentencepiece.train(texts, vocab_size, output_dir, name=name, max_chars=max_chars)
    if backend != "bpe":
        raise ValueError(f"backend={backend!r}: expected 'bpe' or 'sentencepiece'")
    import rustbpe
    n_ranks = vocab_size - len(special_tokens)
    if n_ranks < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {n_ranks} ids after {len(special_tokens)} special tokens; "
                         f"need at least 256 for the byte tokens")
    stream = TextStream(texts, max_chars)
    start = time.monotonic()
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(stream), vocab_size=n_ranks, pattern=pattern)
    ranks = _unique_ranks(trainer.get_mergeable_ranks())
    seconds = time.monotonic() - start
    if trainer.vocab_size < n_ranks:
        logging.warning("the corpus only supports %d merges: n_vocab is %d, not %d", trainer.vocab_size - 256,
                        trainer.vocab_size + len(special_tokens), vocab_size)
    specials = {token: max(ranks.values()) + 1 + i for i, token in enumerate(special_tokens)}
    tokenizer = TiktokenTokenizer(name or f"bpe_{vocab_size}", ranks, pattern, specials)
    logging.info("trained %s on %d documents (%.1fM characters) in %.1fs", tokenizer, stream.documents,
                 stream.characters / 1e6, seconds)
    if output_dir is not None:
        tokenizer.save(output_dir)
        report = dict(documents=stream.documents, characters=stream.characters, replaced_utf8=stream.replaced,
                      seconds=round(seconds, 3), n_vocab=tokenizer.n_vocab, hash=tokenizer.hash)
        (pathlib.Path(output_dir) / TRAIN_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return tokenizer


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


# -- command line -----------------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags():
    """Flags exist only when run as a program, so importing train() never clashes with another module's flags."""
    flags.DEFINE_list("input", None, "Documents: paths, globs or directories (.jsonl[.gz], .json[.gz], .parquet, "
                      ".txt).")
    flags.DEFINE_integer("vocab_size", 32768, "Total vocabulary size, special tokens included.")
    flags.DEFINE_string("output", None, "Directory to write the vocabulary into.")
    flags.DEFINE_enum("backend", "bpe", ["bpe", "sentencepiece"],
                      "bpe: rustbpe, encoded by tiktoken; sentencepiece: SentencePiece BPE with byte fallback.")
    flags.DEFINE_string("text_key", "text", "JSON field / parquet column holding the text.")
    flags.DEFINE_integer("max_chars", 0, "Stop reading after this many characters (0: read everything).")
    flags.mark_flags_as_required(["input", "output"])


def main(argv):
    del argv
    from lm.data.documents import DocumentStats, iter_documents
    stats = DocumentStats()
    texts = (document.text for document in iter_documents(FLAGS.input, FLAGS.text_key, stats))
    tokenizer = train(texts, FLAGS.vocab_size, FLAGS.output, backend=FLAGS.backend, max_chars=FLAGS.max_chars)
    logging.info("documents: %s", stats.summary())
    for rejection in stats.examples[:5]:
        logging.warning("rejected %s:%d: %s", rejection.source, rejection.line, rejection.reason)
    (pathlib.Path(FLAGS.output) / "documents_report.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    print(f"{tokenizer} hash={tokenizer.hash} -> {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Train a vocabulary on files: the documents lm.data.readers reads, trained by lm.tokenizer.train.

    python -m lm.data.train_tokenizer --input='runs/web/text/*.jsonl.gz' --vocab_size=32768 --output=runs/tok

Writes into --output the vocabulary (tokenizer.tiktoken + tokenizer.meta.json + tokenizer.json, or tokenizer.model for
SentencePiece), train_report.json (what training read; the vocabulary size asked for and reached) and
documents_report.json (files read; documents dropped or with invalid UTF-8 replaced, each with file and line).
Inputs that hold no document are an error naming them.
"""
import json
import pathlib

from absl import app, flags, logging

from lm.data import readers
from lm.tokenizer import train as tokenizer_train

DOCUMENTS_REPORT = "documents_report.json"


def run(inputs, vocab_size: int, output_dir, *, backend: str = "bpe", max_chars: int = 0,
        options: readers.ReadOptions | None = None):
    """(tokenizer, ReadStats): trains on the texts of `inputs` (paths, directories, globs) and saves into output_dir."""
    stats = readers.ReadStats()
    texts = (record.text for record in readers.iter_documents(inputs, stats, options))
    try:
        tokenizer = tokenizer_train.train(texts, vocab_size, output_dir, backend=backend, max_chars=max_chars)
    except tokenizer_train.EmptyCorpus:
        raise ValueError(f"no documents to train a tokenizer on in {_names(inputs)}: {stats.summary()}") from None
    logging.info("documents: %s", stats.summary())
    output_dir = pathlib.Path(output_dir)
    (output_dir / DOCUMENTS_REPORT).write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    return tokenizer, stats


def _names(inputs) -> str:
    return ", ".join(map(str, [inputs] if isinstance(inputs, (str, pathlib.Path)) else inputs))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    options = readers.ReadOptions(text_key=FLAGS.text_key)
    tokenizer, stats = run(FLAGS.input, FLAGS.vocab_size, FLAGS.output, backend=FLAGS.backend,
                           max_chars=FLAGS.max_chars, options=options)
    print(f"{stats.summary()}\n{tokenizer} hash={tokenizer.hash} -> {FLAGS.output}")


if __name__ == "__main__":
    flags.DEFINE_list("input", None, "Documents: paths, globs or directories (any format lm.data.readers reads).")
    flags.DEFINE_integer("vocab_size", 32768, "Total vocabulary size, special tokens included.")
    flags.DEFINE_string("output", None, "Directory to write the vocabulary into.")
    flags.DEFINE_enum("backend", "bpe", ["bpe", "sentencepiece"],
                      "bpe: rustbpe, encoded by tiktoken; sentencepiece: SentencePiece BPE with byte fallback.")
    flags.DEFINE_string("text_key", "text", "JSON field / parquet column holding the text.")
    flags.DEFINE_integer("max_chars", 0, "Stop reading after this many characters (0: read everything).")
    flags.mark_flags_as_required(["input", "output"])
    app.run(main)

"""The first N documents of a corpus as one block of text, with a separator and the size of each, then totals.

    python -m lm.data.show --input=/path/to/fineweb.jsonl.gz --n=200
    python -m lm.data.show --input='pages/*.warc.gz' --n=20            # HTML pages shown as trafilatura's text
"""
import dataclasses
import sys

from absl import app, flags

from lm.data import readers


@dataclasses.dataclass
class Totals:
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    lines: int = 0
    skipped: int = 0  # bad inputs (empty, malformed, binary, truncated ...) passed over


def first_documents(inputs: list[str], n: int, extract: bool = True, totals: Totals | None = None):
    """Yields up to `n` readers.Records from `inputs` (paths, directories or globs) in order; HTML becomes its text."""
    totals = totals if totals is not None else Totals()
    if n <= 0:
        return
    stats = readers.ReadStats()
    count = 0
    for record in readers.iter_documents(inputs, stats):
        totals.skipped = stats.dropped
        if extract and record.metadata.get("content_type") == readers.HTML:
            record.text = _extract(record.text)
        yield record
        count += 1
        if count >= n:
            return
    totals.skipped = stats.dropped


def _extract(html: str) -> str:
    from datatrove.pipeline.extractors.trafilatura import Trafilatura
    return Trafilatura().extract(html) or ""


def render(documents, totals: Totals | None = None):
    """Yields the block piece by piece: a separator line per document, its text, and a closing line of totals."""
    totals = totals if totals is not None else Totals()
    for doc in documents:
        text = doc.text
        size = (len(text), len(text.encode("utf-8")), text.count("\n") + 1 if text else 0)
        totals.documents += 1
        totals.characters += size[0]
        totals.bytes += size[1]
        totals.lines += size[2]
        where = f" {doc.metadata['url']}" if doc.metadata.get("url") else ""
        yield (f"===== [{totals.documents}] {doc.id}{where} | {size[0]:,} chars, {size[1]:,} bytes, "
               f"{size[2]:,} lines =====\n")
        yield text if text.endswith("\n") else text + "\n"
    skipped = f", {totals.skipped} bad inputs skipped" if totals.skipped else ""
    yield (f"===== {totals.documents} documents: {totals.characters:,} characters, {totals.bytes:,} bytes, "
           f"{totals.lines:,} lines{skipped} =====\n")


def show(inputs: list[str], n: int = 200, extract: bool = True, out=None) -> Totals:
    """Writes the block for the first `n` documents to `out` (stdout) and returns the totals."""
    out = out or sys.stdout
    totals = Totals()
    for piece in render(first_documents(inputs, n, extract, totals), totals):
        out.write(piece)
    return totals


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as out:
            totals = show(FLAGS.input, FLAGS.n, FLAGS.extract, out)
        print(f"{totals.documents} documents, {totals.characters:,} characters -> {FLAGS.output}")
    else:
        show(FLAGS.input, FLAGS.n, FLAGS.extract)


if __name__ == "__main__":
    flags.DEFINE_multi_string("input", None, "Files, directories or globs (any format lm.data.filter reads).",
                              required=True)
    flags.DEFINE_integer("n", 200, "How many documents.")
    flags.DEFINE_bool("extract", True, "Show HTML pages as the text trafilatura extracts from them.")
    flags.DEFINE_string("output", None, "Write the block to this file instead of stdout.")
    app.run(main)

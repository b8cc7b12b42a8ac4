"""lm.data.readers, the one reader: every format, one UTF-8 rule (replaced, counted, reported with file and line),
every dropped input counted with file, line and reason, and plain-text files split into documents."""
import gzip
import json
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.data import filter_readers, readers

PYTHON_LICENSE = pathlib.Path(os.__file__).parent / "LICENSE.txt"   # real plain text that ships with Python


def _read(paths, **options):
    stats = readers.ReadStats()
    return list(readers.iter_documents(paths, stats, **options)), stats


def test_real_files_of_every_shipped_format(shared_data):
    fineweb, stats = _read(shared_data("web/text/fineweb_sample10BT_2400docs.jsonl.gz"))
    assert len(fineweb) == 2400 and stats.dropped == 0 and stats.files == 1 and stats.utf8_replaced == 0
    assert fineweb[0].line == 1 and fineweb[-1].line == 2400 and fineweb[0].file.endswith(".jsonl.gz")
    assert fineweb[0].id.startswith("<urn:uuid:") and fineweb[0].metadata["url"].startswith("http")
    c4, stats = _read(shared_data("web/text/c4_en_sample.01.json.gz"))        # JSON lines inside .json.gz
    assert len(c4) == 10 and stats.dropped == 0
    japanese, stats = _read(shared_data("web/text/fineweb2_edu_japanese_100_samples.json"))  # one JSON list
    assert len(japanese) == 100 and japanese[99].line == 100 and stats.dropped == 0
    conversations, stats = _read(shared_data("posttrain/sft/fastchat_dummy_conversation.json"))
    assert conversations == [] and stats.by_reason == {"missing_text": 500}
    questions, stats = _read(shared_data("posttrain/gsm8k/test.jsonl"), text_key="question")
    assert len(questions) == 1319


def test_bad_lines_dropped_and_bad_utf8_replaced_each_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "fine"}',
        b'{"text": "broken',
        b'{"text": 42}',
        b'{"body": "no text key"}',
        b'["a list"]',
        b'',
        b'{"text": "  "}',
        b'{"text": "invalid \xff\xfe utf-8"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "last"}',
    ]))
    documents, stats = _read(path)
    assert [(d.line, d.text, d.utf8_replaced) for d in documents] == [
        (1, "fine", False), (8, "invalid \ufffd\ufffd utf-8", True), (9, "lone \ufffd surrogate", True),
        (10, "last", False)]
    assert stats.documents == 4 and stats.utf8_replaced == 2
    assert stats.replaced_examples == [{"file": str(path), "line": 8}, {"file": str(path), "line": 9}]
    assert [(r["line"], r["reason"]) for r in stats.dropped_examples] == [
        (2, "malformed_json"), (3, "missing_text"), (4, "missing_text"), (5, "malformed_record"), (7, "empty_document")]
    assert all(r["file"] == str(path) for r in stats.dropped_examples)
    assert "4 documents" in stats.summary() and "5 dropped" in stats.summary() and "2 with invalid" in stats.summary()
    assert json.loads(json.dumps(stats.to_dict()))["dropped"] == 5


def test_the_filter_reader_follows_the_same_utf8_rule(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"id": "a", "text": "caf\xe9"}\n{"id": "b", "text": "ok"}\n')
    reader = filter_readers.InputReader([str(path)])
    docs = list(reader.run())
    assert [(d.id, d.text) for d in docs] == [("a", "caf\ufffd"), ("b", "ok")]
    assert reader.stats["utf8_replaced"].total == 1 and reader.stats[f"utf8_replaced::{path}"].total == 1
    assert reader.stats["dropped"].total == 0


def test_parquet_txt_globs_and_directories(tmp_path):
    pq.write_table(pa.table({"text": ["row one", None, "row three"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_bytes(b"a whole file \xc3 is one document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    documents, stats = _read([tmp_path / "*.parquet", str(tmp_path / "*.txt"), tmp_path / "sub"])
    assert [(d.text, d.line) for d in documents] == [
        ("row one", 1), ("row three", 3), ("a whole file \ufffd is one document\n", 1), ("zipped", 1)]
    assert documents[2].id == str(tmp_path / "b.txt") and documents[0].id == "1"
    assert stats.files == 3 and stats.utf8_replaced == 1
    assert [(r["line"], r["reason"]) for r in stats.dropped_examples] == [(2, "missing_text")]
    _, stats = _read(tmp_path / "a.parquet", text_key="body")
    assert stats.by_reason == {"missing_text": 1} and "no column 'body'" in stats.dropped_examples[0]["detail"]
    (tmp_path / "sub" / "d.csv").write_text("text\nnot read\n")
    with pytest.raises(ValueError, match=r"d.csv: unknown input format"):
        _read(tmp_path / "sub")


def test_binary_and_empty_text_files_are_dropped(tmp_path):
    (tmp_path / "model.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    documents, stats = _read([tmp_path / "model.txt", tmp_path / "blank.txt"])
    assert documents == [] and stats.by_reason == {"binary_file": 1, "empty_document": 1}


def test_corrupt_file_keeps_what_was_read_and_reports_where_it_stopped(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(2000)))
    (tmp_path / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "ok.jsonl").write_text('{"text": "still read"}\n')
    documents, stats = _read([tmp_path / "truncated.jsonl.gz", tmp_path / "ok.jsonl"])
    assert documents[-1].text == "still read" and len(documents) > 100
    assert stats.by_reason == {"truncated_or_unreadable": 1} and "EOFError" in stats.dropped_examples[0]["detail"]
    bad = stats.dropped_examples[0]
    assert bad["file"].endswith("truncated.jsonl.gz") and bad["line"] == len(documents) - 1   # the last line read


def test_missing_inputs_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(readers.iter_documents(str(tmp_path / "*.jsonl")))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list(readers.iter_documents(tmp_path / "absent.jsonl"))


# -- plain text split into documents ----------------------------------------------------------------------------------
def test_split_text_cuts_at_blank_lines_and_merges_paragraphs_up_to_the_cap():
    text = "Para one, line one.\nline two.\n\nPara two.\n\n\n  \nPara three is longer than the others.\n"
    assert readers.split_text(text, max_chars=1000) == [(1, text)]
    assert readers.split_text(text, max_chars=32) == [
        (1, "Para one, line one.\nline two."), (4, "Para two."), (8, "Para three is longer than the others.\n")]
    assert readers.split_text(text, max_chars=42) == [
        (1, "Para one, line one.\nline two.\n\nPara two."), (8, "Para three is longer than the others.\n")]
    # a paragraph over the cap is cut at line breaks; a line over the cap stays whole
    assert readers.split_text("aaaa\nbbbb\ncc\n\nd", max_chars=9) == [(1, "aaaa\n"), (2, "bbbb\ncc"), (5, "d")]
    assert readers.split_text("x" * 20, max_chars=5) == [(1, "x" * 20)]
    assert readers.split_text(text, separator="", max_chars=10) == [(1, text)]
    assert readers.split_text(text, max_chars=0) == [(1, text)]
    assert readers.split_text(text, separator="Para", max_chars=30)[0] == (1, " one, line one.\nline two.\n\n")


def test_a_real_text_file_becomes_many_documents(tmp_path, shared_data):
    """A 1 MB plain-text corpus (FineWeb documents joined by blank lines) and Python's LICENSE.txt."""
    texts = [r.text for r in readers.iter_documents(shared_data("web/text/fineweb_sample10BT_2400docs.jsonl.gz"))]
    corpus = "\n\n".join(texts[:300])
    (tmp_path / "corpus.txt").write_text(corpus)
    documents, _ = _read(tmp_path / "corpus.txt", txt_max_chars=5000)
    assert len(documents) > len(corpus) // 5000
    # the documents are slices of the file: every line of it is in exactly one document, in order
    lines = [line for line in corpus.split("\n") if line.strip()]
    assert [line for d in documents for line in d.text.split("\n") if line.strip()] == lines
    assert all(len(d.text) <= 5000 or "\n" not in d.text.strip() for d in documents)
    split_lines = corpus.split("\n")
    for d in documents:
        assert split_lines[d.line - 1] == d.text.split("\n")[0]   # line numbers point at each document's start
        assert d.id == f"{tmp_path / 'corpus.txt'}:{d.line}"
    if PYTHON_LICENSE.is_file():
        license_docs, stats = _read(PYTHON_LICENSE, txt_max_chars=2000)
        assert len(license_docs) >= PYTHON_LICENSE.stat().st_size // 2000 and stats.dropped == 0
        assert "PYTHON SOFTWARE FOUNDATION LICENSE" in "".join(d.text for d in license_docs)
    # the filter's datatrove reader splits the same way
    reader = filter_readers.InputReader([str(tmp_path / "corpus.txt")], txt_max_chars=5000)
    assert [d.text for d in reader.run()] == [d.text for d in documents]

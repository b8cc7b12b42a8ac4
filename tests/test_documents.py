"""The shared document reader: every format, and every dropped document counted with file, line and reason."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.data.documents import DocumentStats, iter_documents


def _read(paths, **kwargs):
    stats = DocumentStats()
    return list(iter_documents(paths, stats=stats, **kwargs)), stats


def test_real_files_of_every_shipped_format(shared_data):
    fineweb, stats = _read(shared_data("web/text/fineweb_sample10BT_2400docs.jsonl.gz"))
    assert len(fineweb) == 2400 and stats.rejected == 0 and stats.files == 1
    assert fineweb[0].line == 1 and fineweb[-1].line == 2400 and fineweb[0].source.endswith(".jsonl.gz")
    c4, stats = _read(shared_data("web/text/c4_en_sample.01.json.gz"))        # JSON lines inside .json.gz
    assert len(c4) == 10 and stats.rejected == 0
    japanese, stats = _read(shared_data("web/text/fineweb2_edu_japanese_100_samples.json"))  # one JSON list
    assert len(japanese) == 100 and japanese[99].line == 100 and stats.rejected == 0
    conversations, stats = _read(shared_data("posttrain/sft/fastchat_dummy_conversation.json"))
    assert conversations == [] and stats.by_reason == {"missing key": 500}
    questions, stats = _read(shared_data("posttrain/gsm8k/test.jsonl"), text_key="question")
    assert len(questions) == 1319


def test_bad_lines_are_counted_with_file_line_and_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "fine"}',
        b'{"text": "broken',
        b'{"text": 42}',
        b'{"body": "no text key"}',
        b'["a list"]',
        b'',
        b'{"text": ""}',
        b'{"text": "invalid \xff\xfe utf-8"}',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "last"}',
    ]))
    documents, stats = _read(path)
    assert [(d.line, d.text) for d in documents] == [
        (1, "fine"), (8, "invalid \ufffd\ufffd utf-8"), (9, "lone \ufffd surrogate"), (10, "last")]
    assert stats.replaced_utf8 == 2 and stats.documents == 4
    assert [(r.line, r.reason.split(":")[0]) for r in stats.examples] == [
        (2, "malformed JSON"), (3, "text not a string"), (4, "missing key"), (5, "not a JSON object"),
        (7, "empty text")]
    assert all(r.source == str(path) for r in stats.examples)
    assert "4 documents" in stats.summary() and "5 rejected" in stats.summary()
    assert json.loads(json.dumps(stats.to_dict()))["rejected"] == 5


def test_parquet_txt_globs_and_directories(tmp_path):
    pq.write_table(pa.table({"text": ["row one", None, "row three"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_bytes(b"a whole file \xc3 is one document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    (tmp_path / "sub" / "d.csv").write_text("text\nnot read\n")
    documents, stats = _read([tmp_path / "*.parquet", str(tmp_path / "*.txt"), tmp_path / "sub"])
    assert [(d.text, d.line) for d in documents] == [
        ("row one", 1), ("row three", 3), ("a whole file \ufffd is one document\n", 1), ("zipped", 1)]
    assert stats.files == 4 and stats.replaced_utf8 == 1
    assert [(r.line, r.reason.split(":")[0]) for r in stats.examples] == [(2, "text not a string"),
                                                                         (0, "unsupported format")]
    _, stats = _read(tmp_path / "a.parquet", text_key="body")
    assert stats.by_reason == {"unreadable file": 1} and "no column 'body'" in stats.examples[0].reason


def test_corrupt_file_keeps_what_was_read_and_reports_the_rest(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(2000)))
    (tmp_path / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "ok.jsonl").write_text('{"text": "still read"}\n')
    documents, stats = _read([tmp_path / "truncated.jsonl.gz", tmp_path / "ok.jsonl"])
    assert documents[-1].text == "still read" and len(documents) > 100
    assert stats.by_reason == {"unreadable file": 1} and "EOFError" in stats.examples[0].reason
    assert stats.examples[0].source.endswith("truncated.jsonl.gz") and stats.examples[0].line == len(documents) - 1


def test_missing_inputs_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_documents(tmp_path / "absent.jsonl"))

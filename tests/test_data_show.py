"""lm.data.show: the first N documents as one block, with separators, sizes and totals."""
import gzip
import io
import json
import re
import subprocess
import sys

from lm.data import show


def test_block_of_first_documents_with_sizes_and_totals(shared_data):
    path = shared_data("web/text/fineweb_sample10BT_2400docs.jsonl.gz")
    out = io.StringIO()
    totals = show.show([str(path)], n=5, out=out)
    block = out.getvalue()
    with gzip.open(path, "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(5)]
    headers = re.findall(r"^===== \[(\d+)\] (\S+) .*\| ([\d,]+) chars, ([\d,]+) bytes, ([\d,]+) lines =====$",
                         block, flags=re.M)
    assert [int(h[0]) for h in headers] == [1, 2, 3, 4, 5]
    for header, text in zip(headers, texts):
        assert int(header[2].replace(",", "")) == len(text)
        assert int(header[3].replace(",", "")) == len(text.encode("utf-8"))
        assert text in block
    assert totals.documents == 5 and totals.characters == sum(map(len, texts))
    assert totals.bytes == sum(len(t.encode()) for t in texts)
    assert totals.lines == sum(t.count("\n") + 1 for t in texts)
    assert block.rstrip().endswith(f"{sum(map(len, texts)):,} characters, {totals.bytes:,} bytes, "
                                   f"{totals.lines:,} lines =====")


def test_html_pages_shown_as_text_and_bad_input_skipped(shared_data, tmp_path):
    warc = shared_data("web/warc/dolma-sample-0000.warc.gz")
    out = io.StringIO()
    totals = show.show([str(warc)], n=3, out=out)
    assert totals.documents == 3 and "<html" not in out.getvalue().lower()
    assert "https://www.semanticscholar.org/research/research-team" in out.getvalue()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{broken\n{"text": ""}\n{"text": "two"}\n')
    totals = show.show([str(bad)], n=10, out=io.StringIO())
    assert totals.documents == 2 and totals.skipped == 2


def test_cli(shared_data, tmp_path):
    path = shared_data("web/text/c4_en_sample.01.json.gz")
    result = subprocess.run([sys.executable, "-m", "lm.data.show", f"--input={path}", "--n=2"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.count("===== [") == 2 and "===== 2 documents:" in result.stdout

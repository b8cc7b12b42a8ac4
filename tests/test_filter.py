"""lm.data.filter on small inputs: config, readers (bad input counted, never lost), sharding, offline blocks."""
import gzip
import json
import os

import pytest

from lm.data import filter as recipe
from lm.data import filter_blocks, filter_readers, readers
from datatrove.data import Document


def write_jsonl_gz(path, lines: list[bytes]):
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def read_all(files, **kwargs):
    reader = filter_readers.InputReader(files, **kwargs)
    return [item for path in reader.files for item in reader.read_file(path)]


# ---------------------------------------------------------------- config

def test_presets_switch_blocks_and_keep_fineweb_defaults():
    web = recipe.default_config()
    assert all(web[b].enabled for b in (*recipe.FILTER_BLOCKS, "minhash", "pii"))
    assert web.language.languages == ("en",) and web.language.language_threshold == 0.65
    assert web.c4.filter_no_terminal_punct is False  # as FineWeb ran C4
    assert (web.minhash.n_grams, web.minhash.num_buckets, web.minhash.hashes_per_bucket) == (5, 14, 8)
    assert os.path.isfile(web.language.model) and os.path.isfile(web.url_filter.blocklist)
    text = recipe.default_config("text")
    assert not text.url_filter.enabled and not text.extract.enabled and text.language.enabled
    bundled = recipe.default_config("bundled")
    assert bundled.gopher_quality.max_non_alpha_words_ratio < web.gopher_quality.max_non_alpha_words_ratio
    assert bundled.language.language_threshold == 0.65


@pytest.mark.parametrize("key, value, words", [
    ("executor", "spark", "config.filter.executor='spark'"),
    ("workers", 0, "config.filter.workers=0"),
    ("tasks", 0, "config.filter.tasks=0"),
])
def test_bad_config_names_the_key(key, value, words):
    c = recipe.default_config()
    c[key] = value
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        recipe.validate(c)


def test_missing_model_and_partition_are_clear_errors():
    c = recipe.default_config()
    c.language.model = "/nowhere/lid.176.ftz"
    with pytest.raises(ValueError, match="config.filter.language.model"):
        recipe.validate(c)
    c = recipe.default_config()
    c.executor = "slurm"
    with pytest.raises(ValueError, match="slurm.partition"):
        recipe.validate(c)


def test_unknown_block_parameter_names_the_block(tmp_path):
    c = recipe.default_config("text")
    c.gopher_quality.min_doc_wordz = 3
    with pytest.raises(ValueError, match=r"config.filter.gopher_quality: .*min_doc_wordz"):
        recipe.plan(c, ["x.jsonl"], str(tmp_path))


def test_every_block_can_be_switched_off_and_reparameterised(tmp_path):
    c = recipe.default_config()
    c.gopher_quality.min_doc_words = 7
    stages = recipe.plan(c, ["x.jsonl"], str(tmp_path))
    assert [s.name for s in stages] == ["main", "minhash_buckets", "minhash_clusters", "dedup_filter"]
    gopher = next(s for s in stages[0].pipeline if s.name == "🥇 Gopher Quality")
    assert gopher.min_doc_words == 7
    for block in (*recipe.FILTER_BLOCKS, "minhash", "pii"):
        c[block].enabled = False
    stages = recipe.plan(c, ["x.jsonl"], str(tmp_path))
    assert len(stages) == 1
    assert [type(s).__name__ for s in stages[0].pipeline] == ["InputReader", "Tally", "Progress", "JsonlWriter"]


# ---------------------------------------------------------------- readers

def test_format_detection_and_input_errors(tmp_path):
    assert readers.file_format("a/CC-MAIN-1.warc.wet.gz") == "warc"
    assert readers.file_format("x.jsonl.zst") == "jsonl"
    assert readers.file_format("part.parquet") == "parquet"
    assert readers.file_format("page.HTML.gz") == "html"
    with pytest.raises(ValueError, match="unknown input format"):
        readers.file_format("model.bin")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        readers.expand_inputs([str(tmp_path / "*.jsonl")])
    assert readers.fineweb_pattern("fineweb:sample/10BT") == \
        "hf://datasets/HuggingFaceFW/fineweb/sample/10BT/**/*.parquet"


def test_bad_jsonl_lines_are_counted_with_file_and_line(tmp_path):
    path = write_jsonl_gz(tmp_path / "docs.jsonl.gz", [
        json.dumps({"id": "a", "text": "A good document.", "url": "http://a.example/"}).encode(),
        b'{"id": "b", "text": "cut off',
        json.dumps({"id": "c", "text": "  "}).encode(),
        '{"id": "d", "text": "caf\u00e9"}'.encode("latin-1"),
        b"[1, 2]",
        json.dumps({"id": "e", "text": "Another one."}).encode(),
    ])
    items = read_all([path])
    docs = [i for i in items if isinstance(i, Document)]
    bad = [(i.reason, i.line) for i in items if isinstance(i, readers.Bad)]
    assert [d.id for d in docs] == ["a", "d", "e"] and docs[0].metadata["url"] == "http://a.example/"
    assert docs[1].text == "caf\ufffd"  # one UTF-8 rule everywhere: invalid bytes replaced, the document kept
    assert bad == [("malformed_json", 2), ("empty_document", 3), ("malformed_record", 5)]


def test_truncated_gzip_keeps_what_was_read_and_counts_the_rest(tmp_path):
    lines = [json.dumps({"id": str(i), "text": f"document {i} " * 200}).encode() for i in range(50)]
    whole = write_jsonl_gz(tmp_path / "whole.jsonl.gz", lines)
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    items = read_all([str(cut)])
    assert 0 < sum(isinstance(i, Document) for i in items) < 50
    assert isinstance(items[-1], readers.Bad) and items[-1].reason == "truncated_or_unreadable"


def test_json_array_parquet_and_text_files(tmp_path, shared_data):
    japanese = shared_data("web/text/fineweb2_edu_japanese_100_samples.json")
    items = read_all([str(japanese)])
    assert len(items) == 100 and all(isinstance(i, Document) for i in items)
    assert items[0].metadata["language"] == "jpn" and items[0].id.startswith("<urn:uuid:")

    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"text": "Parquet text.", "id": "p0", "dump": "CC-MAIN-2024-10", "url": "http://p.example/",
             "language_score": 0.9, "token_count": 3}, {"text": "", "id": "p1", "dump": "x", "url": "",
                                                        "language_score": 0.1, "token_count": 0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "fineweb.parquet")
    (tmp_path / "note.txt").write_text("Plain text file.\n")
    (tmp_path / "page.html").write_bytes("<html><body><p>Caf\u00e9</p></body></html>".encode("cp1252"))
    items = read_all(readers.expand_inputs([str(tmp_path)]))
    by_id = {i.id.rsplit("/", 1)[-1]: i for i in items if isinstance(i, Document)}
    assert by_id["p0"].metadata["dump"] == "CC-MAIN-2024-10" and by_id["p0"].metadata["token_count"] == 3
    assert by_id["note.txt"].text == "Plain text file.\n"
    assert "Caf\u00e9" in by_id["page.html"].text  # not UTF-8, but its charset is detected
    assert by_id["page.html"].metadata["content_type"] == readers.HTML
    assert [i.reason for i in items if isinstance(i, readers.Bad)] == ["empty_document"]


def test_warc_pages_and_truncated_warc(tmp_path, shared_data):
    warc = shared_data("web/warc/dolma-sample-0000.warc.gz")
    items = read_all([str(warc)])
    pages = [i for i in items if isinstance(i, Document)]
    assert len(pages) == 21 and all(p.metadata["url"].startswith("http") for p in pages)
    assert [i.reason for i in items if isinstance(i, readers.Bad)] == ["not_html"]
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(warc.read_bytes()[:100_000])
    items = read_all([str(cut)])
    assert 0 < sum(isinstance(i, Document) for i in items) < 21
    assert items[-1].reason == "truncated_or_unreadable"
    wet = read_all([str(shared_data("web/warc/whirlwind.warc.wet.gz"))])
    assert len(wet) == 1 and wet[0].metadata["content_type"] == readers.PLAIN


@pytest.mark.parametrize("n_files, world_size", [(1, 3), (2, 2), (5, 2)])
def test_sharding_covers_every_item_exactly_once(tmp_path, n_files, world_size):
    files = []
    for f in range(n_files):
        lines = [json.dumps({"id": f"{f}-{i}", "text": f"doc {i}"}).encode() for i in range(7)] + [b"{bad"]
        files.append(write_jsonl_gz(tmp_path / f"{f}.jsonl.gz", lines))
    seen, bad = [], 0
    for rank in range(world_size):
        reader = filter_readers.InputReader(files)
        seen += [d.id for d in reader.run(rank=rank, world_size=world_size)]
        bad += reader.stats["dropped"].total
    assert sorted(seen) == sorted(f"{f}-{i}" for f in range(n_files) for i in range(7))
    assert bad == n_files


# ---------------------------------------------------------------- blocks

def make_blocklist(path, domains: list[str], urls: list[str]) -> str:
    import io
    import tarfile
    with tarfile.open(path, "w:gz") as tar:
        for name, lines in (("urls", urls), ("domains", domains)):
            data = "\n".join(lines).encode() + b"\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_url_filter_reads_blocklist_tarball_offline(tmp_path):
    blocklist = make_blocklist(tmp_path / "lists.tar.gz", ["blocked-site.com", "sub.other-site.org"],
                               ["http://ok.example/bad.html"])
    block = filter_blocks.URLFilter(blocklist=blocklist)
    block.download_data()
    word = sorted(block.banned_words)[0]  # from datatrove's own list, not spelled out here

    def verdict(url=None):
        return block.filter(Document("x", "1", metadata={"url": url} if url else {}))
    assert verdict("http://www.blocked-site.com/page") == (False, "domain")
    assert verdict("https://sub.other-site.org/") == (False, "subdomain")
    assert verdict("http://ok.example/bad.html") == (False, "url")
    assert verdict(f"http://ok.example/{word}/") == (False, "hard_blacklisted")
    assert verdict("https://docs.python.org/3/library/") is True
    assert verdict() is True and block.stats["no_url"].total == 1


@pytest.mark.parametrize("data", [b"a.com\nb.org\n\nc.net", b"# comment\n a.com \r\nb.org\n"])
def test_blocklist_fast_path_matches_datatrove_parse_list(data):
    from datatrove.pipeline.filters.url_filter import parse_list
    expected = parse_list([line for line in data.decode().splitlines() if line], do_normalize=False)
    assert filter_blocks._read_list(data) == expected


def test_language_filter_with_local_model():
    c = recipe.default_config()
    block = filter_blocks.LanguageFilter(**recipe._params(c.language))
    english = Document("The quick brown fox jumps over the lazy dog near the river bank.", "en")
    french = Document("Le renard brun rapide saute par-dessus le chien paresseux.", "fr")
    assert list(block.run(iter([english, french]))) == [english]
    assert french.metadata["language"] == "fr" and english.metadata["language_score"] > 0.65


def test_tally_counts_utf8_bytes():
    tally = filter_blocks.Tally("x")
    docs = [Document("caf\u00e9", "1"), Document("ab", "2")]
    assert list(tally.run(iter(docs))) == docs
    assert tally.stats["documents"].total == 2 and tally.stats["bytes"].total == 5 + 2


# ---------------------------------------------------------------- CLI, resume, other executors

def fineweb_docs(shared_data, tmp_path, n=12):
    with gzip.open(shared_data("web/text/fineweb_sample10BT_2400docs.jsonl.gz"), "rb") as f:
        return write_jsonl_gz(tmp_path / "in.jsonl.gz", [next(f).rstrip(b"\n") for _ in range(n)])


def test_cli_preset_overrides_report_only_and_resume(shared_data, tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src, out = fineweb_docs(shared_data, tmp_path), tmp_path / "out"
    off = [f"--config.{b}.enabled=false" for b in ("gopher_repetition", "gopher_quality", "c4", "minhash")]
    cmd = [sys.executable, "-m", "lm.data.filter", "--config=lm/data/filter.py:text", *off, "--config.workers=1",
           f"--input={src}", f"--workdir={out}"]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in 12 = kept" in result.stdout
    report = json.loads((out / "filter_report.json").read_text())
    assert [b["block"] for b in report["blocks"]] == ["read", "language", "fineweb_quality", "pii"]
    again = subprocess.run(cmd + ["--report_only"], cwd=repo, capture_output=True, text=True, check=True)
    assert again.stdout.splitlines()[-1] == result.stdout.splitlines()[-1]

    c = recipe.default_config("text")  # the same config in-process: the finished run is reused
    for block in ("gopher_repetition", "gopher_quality", "c4", "minhash"):
        c[block].enabled = False
    c.workers = 1
    shard = out / "text" / "00000.jsonl.gz"
    written = shard.stat().st_mtime_ns
    assert recipe.run(c, [src], out)["documents_kept"] == report["documents_kept"]
    assert shard.stat().st_mtime_ns == written
    c.language.language_threshold = 0.99  # a changed config starts afresh; keeping nothing stops with a hint
    with pytest.raises(recipe.KeptNothing, match=r"kept 0 of 12 documents: language dropped 12 \(not_language=12\)"
                                                 r".*relax config.filter.language.language_threshold"):
        recipe.run(c, [src], out)
    assert json.loads((out / "filter_report.json").read_text())["documents_kept"] == 0
    assert not shard.exists() or shard.stat().st_mtime_ns != written


def test_slurm_executor_chain_is_built_without_submitting(tmp_path):
    c = recipe.default_config("text")
    c.executor, c.slurm.partition, c.tasks = "slurm", "cpu", 8
    stages = recipe.plan(c, ["x.jsonl"], str(tmp_path))
    chain = recipe.executors(c, stages, str(tmp_path))
    assert [type(e).__name__ for e in chain] == ["SlurmPipelineExecutor"] * 4
    assert [e.tasks for e in chain] == [8, 14, 1, 8]
    assert all(later.depends is earlier for earlier, later in zip(chain, chain[1:]))


# ---------------------------------------------------------------- word splitting, the Gopher alpha rule

def test_nltk_words_split_like_nltk_word_tokenize_with_the_english_punkt_model():
    import pickle
    words = filter_blocks.NLTKWords()
    text = "Mr. Smith paid $3.50 for the U.S. edition, didn't he? Yes. Dr. Who came."
    # NLTK's word_tokenize with the trained English Punkt: "Mr." and "U.S." are abbreviations, not sentence ends
    assert words.word_tokenize(text) == ["Mr.", "Smith", "paid", "$", "3.50", "for", "the", "U.S.", "edition", ",",
                                         "did", "n't", "he", "?", "Yes", ".", "Dr.", "Who", "came", "."]
    assert words.sent_tokenize(text) == ["Mr. Smith paid $3.50 for the U.S. edition, didn't he?", "Yes.",
                                         "Dr. Who came."]
    assert len(pickle.dumps(words)) < 500  # workers rebuild the Punkt tables instead of unpickling them
    assert pickle.loads(pickle.dumps(words)).word_tokenize("A b. C") == ["A", "b", ".", "C"]


def test_gopher_alpha_rule_counts_whitespace_words():
    # 60 words, each followed by a comma or in parentheses: 100% of whitespace words hold a letter, but the
    # tokenizer's commas and brackets make more than 20% of its tokens letter-free
    text = " ".join(f"the ({w})," if i % 2 else f"and {w}," for i, w in enumerate(["alpha", "beta", "gamma"] * 20))
    doc = Document(text, "1")
    words = filter_blocks.NLTKWords()
    assert filter_blocks.GopherQuality(language=words).filter(doc) is True
    assert filter_blocks.GopherQuality(language=words, alpha_words="tokens").filter(doc) == \
        (False, "gopher_below_alpha_threshold")
    numbers = Document(" ".join(["1234 5678 9012 3456 that with have"] * 20), "2")  # 4 of 7 whitespace words without a letter
    assert filter_blocks.GopherQuality(language=words).filter(numbers) == (False, "gopher_below_alpha_threshold")


# ---------------------------------------------------------------- HTML extraction that cannot run

def abort_at_start(text):
    os.abort()  # a real crash of the sandboxed worker, during its warm-up


def missing_dependency(text):
    import lm_no_such_extractor_dependency  # noqa: F401


def abort_on_marked_page(text):
    if "CRASH" in text:
        os.abort()
    return text.replace("<p>", "").replace("</p>", "")


def html_docs(n, marked=()):
    return [Document(f"<p>{'CRASH ' if i in marked else ''}page {i}</p>", str(i),
                     metadata={"content_type": readers.HTML}) for i in range(n)]


@pytest.mark.parametrize("worker, reason", [(abort_at_start, "exited with code -6 before it was ready"),
                                            (missing_dependency, "ModuleNotFoundError")])
def test_dead_extractor_is_an_extract_error_at_once(tmp_path, worker, reason):
    import time
    block = filter_blocks.Extract(exclusion_writer=filter_blocks.DroppedWriter(str(tmp_path), "extract"),
                                  timeout=20.0)
    block.extractor.extract = worker
    start = time.monotonic()
    assert list(block.run(iter(html_docs(4)))) == []
    assert time.monotonic() - start < 10  # not 4 x the 20 s timeout
    assert block.stats["dropped_extract_error"].total == 4 and "dropped_extract_timeout" not in block.stats.stats
    from tests.conftest import records
    dropped = records(tmp_path)
    assert len(dropped) == 4 and all(reason in r["metadata"]["filter_detail"] for r in dropped)


def test_extractor_dying_on_one_page_drops_only_that_page(tmp_path):
    block = filter_blocks.Extract(exclusion_writer=filter_blocks.DroppedWriter(str(tmp_path), "extract"),
                                  timeout=20.0)
    block.extractor.extract = abort_on_marked_page
    kept = list(block.run(iter(html_docs(4, marked=(1,)))))
    assert [d.text for d in kept] == ["page 0", "page 2", "page 3"]  # restarted after the crash
    from tests.conftest import records
    [dropped] = records(tmp_path)
    assert dropped["id"] == "1" and dropped["metadata"]["filter_reason"] == "extract_error"
    assert "died on this page" in dropped["metadata"]["filter_detail"]


# ---------------------------------------------------------------- the filter process, its output

def test_progress_line_and_document_count(shared_data, tmp_path):
    assert recipe.progress_line(600, 2400, 30.0) == \
        "filter: 600/2,400 documents read (25%), 20/s, ETA 0:01:30"
    assert recipe.progress_line(600, None, 30.0) == "filter: 600 documents read, 20/s"
    src = shared_data("web/text/fineweb_sample10BT_2400docs.jsonl.gz")
    assert recipe.count_documents([str(src)]) == 2400
    assert recipe.count_documents([str(shared_data("web/warc/whirlwind.warc.gz"))]) is None


def test_run_from_a_jax_process_forks_nothing_there_and_prints_a_short_table(shared_data, tmp_path):
    import subprocess
    import sys
    src, out = fineweb_docs(shared_data, tmp_path, n=12), tmp_path / "out"
    script = f"""
import jax, jax.numpy as jnp
jnp.ones(4).sum().block_until_ready()  # JAX's threads are running
from lm.data import filter as recipe
c = recipe.default_config("text")
c.minhash.enabled = False
c.workers = 2
r = recipe.run(c, [{str(src)!r}], {str(out)!r})
assert r["documents_in"] == 12
"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "os.fork()" not in result.stderr and "multithreaded" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 15 and any(line.startswith("in 12 = kept") for line in lines)
    log = (out / "filter" / "logs" / "filter.log").read_text()
    assert "Processing done for rank" in log and "Stats" in log  # datatrove's details are in the log file

"""The bundled default corpus (CPython's own docs) and what the text stages of the recipe keep of it."""
import gzip
import json
import re
import sys

import pytest

from lm.data import bundled
from lm.data import filter as recipe

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundled") / "python_docs.jsonl.gz"
    count = bundled.write_corpus(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return path, count, records


def test_one_document_per_topic_and_module(corpus):
    path, count, records = corpus
    assert count == len(records) > 500
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    from pydoc_data.topics import topics
    assert sum(r["source"] == bundled.SOURCE_TOPICS for r in records) == len([t for t in topics.values() if t.strip()])
    by_id = {r["id"]: r for r in records}
    assert "python-docs/topic/for" in by_id and "The \"for\" statement" in by_id["python-docs/topic/for"]["text"]
    json_doc = by_id["python-docs/module/json"]["text"]
    assert json_doc.startswith("Module json\n\nJSON (JavaScript Object Notation)") and "dumps(" in json_doc
    assert "python-docs/module/math" in by_id  # an extension module, read by importing it
    assert not any("/test." in i or i.endswith("/test") for i in ids)
    assert sum(len(r["text"].encode()) for r in records) > 1.5e6
    assert all(r["text"].strip() for r in records)


def test_no_module_is_executed_for_its_docs(corpus):
    assert "antigravity" not in sys.modules and "this" not in sys.modules and "turtle" not in sys.modules


def test_corpus_order_is_deterministic(corpus):
    _, _, records = corpus
    for source in (bundled.SOURCE_TOPICS, bundled.SOURCE_MODULES):
        ids = [r["id"] for r in records if r["source"] == source]
        assert ids == sorted(ids)
    assert records[0]["source"] == bundled.SOURCE_TOPICS and records[-1]["source"] == bundled.SOURCE_MODULES


@pytest.fixture(scope="module")
def filtered(corpus, tmp_path_factory):
    path, _, records = corpus
    workdir = tmp_path_factory.mktemp("bundled_run")
    return recipe.run(recipe.default_config("bundled"), [str(path)], workdir), workdir, records


def test_bundled_preset_keeps_enough_text_and_masks_real_emails(filtered):
    report, workdir, records = filtered
    assert report["documents_in"] == len(records)
    assert report["documents_in"] == report["documents_kept"] + report["documents_dropped"]
    assert report["bytes_kept"] > 1.0e6 and report["documents_kept"] > 250
    kept = []
    for path in sorted((workdir / "text").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            kept += [json.loads(line) for line in f]
    assert len(kept) == report["documents_kept"] and all(r["text"] and r["id"] for r in kept)
    real = {e for r in records for e in EMAIL.findall(r["text"]) if "example" not in e}
    assert len(real) >= 5  # e.g. the encodings package's author
    kept_by_id = {r["id"]: r["text"] for r in kept}
    masked = [i for i, r in ((r["id"], r) for r in records) if EMAIL.search(r["text"]) and i in kept_by_id]
    assert masked, "some documents with real e-mail addresses should survive the filters"
    assert not any(e in text for text in kept_by_id.values() for e in real)

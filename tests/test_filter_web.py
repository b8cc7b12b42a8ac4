"""The whole web recipe on real Common Crawl / wget WARCs, with planted bad input, and the network unavailable."""
import io
import json
import os
import socket
import tarfile

import pytest
from datatrove.utils._import_utils import ASSETS_PATH
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from lm.data import filter as recipe
from tests.conftest import records, shared_path

WARCS = ["web/warc/dolma-sample-0000.warc.gz", "web/warc/dolma-sample-0001.warc.gz",
         "web/warc/resiliparse-cc-main-2020-34-excerpt.warc.gz", "web/warc/whirlwind.warc.gz",
         "web/warc/whirlwind.warc.wet.gz"]
ARTICLE = "https://maria-antoniak.github.io/2023/07/04/notes-on-mastodon.html"


GUARD = """
import os, socket
def _refuse(*args, **kwargs):
    raise OSError("network access attempted in an offline test")
_connect = socket.socket.connect
def _guarded_connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        _refuse()
    return _connect(sock, address)
socket.getaddrinfo = socket.create_connection = _refuse
socket.socket.connect = _guarded_connect
with open(os.environ["LM_TEST_NETWORK_GUARD_LOG"], "a") as _f:
    _f.write(f"{os.getpid()}\\n")
"""


@pytest.fixture(scope="module")
def no_network(tmp_path_factory):
    """Any attempt to resolve or reach an internet host fails (local unix sockets still work), in this process and
    in every Python process started from it (the filter runs in one): a sitecustomize on PYTHONPATH installs the
    same guard there and logs each process it guards."""
    guard = tmp_path_factory.mktemp("guard")
    (guard / "sitecustomize.py").write_text(GUARD)
    log = guard / "guarded_pids.txt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH")) if p))
        mp.setenv("LM_TEST_NETWORK_GUARD_LOG", str(log))
        exec(compile(GUARD, "guard", "exec"), {"__name__": "guard"})  # and here
        yield log
    socket.getaddrinfo, socket.create_connection, socket.socket.connect = REAL_SOCKET


REAL_SOCKET = (socket.getaddrinfo, socket.create_connection, socket.socket.connect)


def page_urls(warc_path) -> list[str]:
    with open(warc_path, "rb") as f:
        return [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(f) if r.rec_type == "response"]


def html_of(warc_path, url) -> bytes:
    with open(warc_path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "response" and record.rec_headers.get_header("WARC-Target-URI") == url:
                return record.content_stream().read()
    raise LookupError(url)


def write_warc(path, pages: list[tuple[str, bytes]]):
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for url, body in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                url, "response", payload=io.BytesIO(body), http_headers=http,
                warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"}))


def blocklisted_domain() -> str:
    with tarfile.open(recipe.BLOCKLIST, "r:gz") as tar:
        return tar.extractfile("domains").readline().decode().strip()


def banned_word() -> str:
    with open(f"{ASSETS_PATH}/banned_words.txt") as f:
        return next(w.strip() for w in f if w.strip() and not w.startswith("#"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, no_network):
    tmp = tmp_path_factory.mktemp("web")
    warcs = [shared_path(p) for p in WARCS]
    article = html_of(warcs[0], ARTICLE)
    garbage = b"<html><body><p>" + b"\x81 " * 500 + b"</p></body></html>"  # neither UTF-8 nor any detected charset
    blocked_url = f"http://{blocklisted_domain()}/notes.html"
    banned_url = f"https://news.example-site.com/{banned_word()}/notes.html"
    write_warc(tmp / "planted.warc.gz", [(blocked_url, article), (banned_url, article),
                                         ("https://garbage.example-site.com/", garbage)])
    truncated = tmp / "truncated.warc.gz"
    truncated.write_bytes(warcs[1].read_bytes()[:60_000])
    c = recipe.default_config("web")
    c.workers, c.tasks = 1, 1
    c.extract.timeout = 10.0  # loaded CI machines
    workdir = tmp / "out"
    report = recipe.run(c, [str(p) for p in warcs] + [str(tmp / "planted.warc.gz"), str(truncated)], workdir)
    assert {int(p) for p in no_network.read_text().split()} - {os.getpid()}  # the filter's process was guarded
    return report, workdir, {"blocked": blocked_url, "banned": banned_url}


def dropped_by_url(workdir) -> dict[str, tuple[str, str, str | None]]:
    """url -> (block, reason, language) of every dropped page (the last one, for a URL seen twice)."""
    out = {}
    for folder in sorted((workdir / "dropped").iterdir()):
        for r in records(folder):
            meta = r.get("metadata", {})
            out[meta.get("url") or r["id"]] = (folder.name, meta["filter_reason"], meta.get("language"))
    return out


def test_non_english_and_spam_pages_dropped_for_the_right_reasons(run):
    report, workdir, _ = run
    dropped = dropped_by_url(workdir)
    kept = {r["url"] for r in records(workdir / "text")}
    # The CC-MAIN-2020-34 excerpt is Chinese, Russian, German and Dutch spam: nothing of it survives.
    cc_pages = page_urls(shared_path(WARCS[2]))
    assert len(cc_pages) == 16 and all(u in dropped for u in cc_pages) and not kept & set(cc_pages)
    assert dropped["http://01spb.ru/company/"] == ("language", "not_language", "ru")  # windows-1251, decoded
    assert dropped["http://003338.cn/l41/481397.html"][::2] == ("language", "zh")
    assert dropped["http://06.live-radsport.ch/tippspiel/stats_140_petzi.html"][::2] == ("language", "de")
    assert dropped["https://an.wikipedia.org/wiki/Escopete"][:2] == ("language", "not_language")  # Aragonese
    english_spam = [dropped[u] for u in cc_pages if dropped[u][2] == "en"]
    assert english_spam and all(b in recipe.FILTER_BLOCKS[3:] for b, _, _ in english_spam)


def test_english_articles_kept_and_planted_urls_blocked(run):
    report, workdir, planted = run
    kept = {r["url"]: r for r in records(workdir / "text")}
    for url in (ARTICLE, "https://creativecommons.org/mission/", "https://commoncrawl.org/faq",
                "https://maria-antoniak.github.io/2022/07/27/topic-modeling-for-the-people.html"):
        assert url in kept and kept[url]["language"] == "en" and "<" not in kept[url]["text"][:200]
    assert "Mastodon" in kept[ARTICLE]["text"]
    dropped = dropped_by_url(workdir)
    assert dropped[planted["blocked"]][:2] == ("url_filter", "domain")
    assert dropped[planted["banned"]][:2] == ("url_filter", "hard_blacklisted")


def test_bad_input_counted_with_file_and_reason(run):
    report, workdir, _ = run
    bad = {(b["file"].rsplit("/", 1)[-1], b["reason"]): b["count"] for b in report["bad_input"]}
    assert bad[("truncated.warc.gz", "truncated_or_unreadable")] == 1
    assert ("planted.warc.gz", "not_utf8") not in bad  # invalid UTF-8 is replaced and counted, the page kept
    replaced = {r["file"].rsplit("/", 1)[-1]: r["count"] for r in report["utf8_replaced"]}
    assert replaced["planted.warc.gz"] == 1
    assert bad[("dolma-sample-0000.warc.gz", "not_html")] == 1
    read = report["blocks"][0]
    assert read["dropped"] == sum(bad.values()) == sum(read["reasons"].values())


def test_report_adds_up_and_matches_the_files(run):
    report, workdir, _ = run
    assert [b["block"] for b in report["blocks"]] == ["read", *recipe.FILTER_BLOCKS, "minhash", "pii"]
    assert report["documents_in"] == report["documents_kept"] + report["documents_dropped"]
    # independent count of what was written
    for b in report["blocks"]:
        assert len(records(workdir / "dropped" / b["block"])) == b["dropped"], b["block"]
    texts = [r["text"] for r in records(workdir / "text")]
    assert len(texts) == report["documents_kept"] > 20
    assert sum(len(t.encode()) for t in texts) == report["bytes_kept"]
    assert report["blocks"][-2]["reasons"].get("near_duplicate", 0) >= 2  # allenai.org is crawled three times
    on_disk = json.loads((workdir / "filter_report.json").read_text())
    assert on_disk["documents_kept"] == report["documents_kept"]
    assert "in " in recipe.format_table(report) and "url_filter" in recipe.format_table(report)

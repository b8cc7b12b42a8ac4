"""The bits -> bytes -> tokens viewer, in the terminal and as a self-contained HTML page."""
import os
import re
import subprocess
import sys

import pytest

from lm import tokenizer
from lm.tokenizer import show
from tests.test_tokenizer import CL100K


@pytest.fixture
def cl100k(shared_data):
    from tests.test_tokenizer import _load
    return _load(shared_data(CL100K))


def test_chunks_join_tokens_into_whole_characters(cl100k):
    ids = cl100k.encode("hi 👋")
    chunks = show.token_chunks(cl100k, ids)
    assert [c.text for c in chunks] == ["hi", " 👋"]
    assert sum(len(c.ids) for c in chunks) == len(ids) and len(chunks[1].ids) > 1
    assert show.token_chunks(cl100k, ids[:-1])[-1].text.endswith("\ufffd")   # a dangling partial character


def test_terminal_view_shows_bits_bytes_tokens_and_merges(cl100k):
    out = show.render_terminal("hello world\n", cl100k, merges=3)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "U+0068  01101000" in plain                       # h
    assert "104 101 108 108 111 32 119" in plain             # bytes
    assert "hello·world↵" in plain and "15339 1917 198" in plain
    assert "[·][·] → [··] 256" in plain                      # cl100k's first merge
    assert "\x1b[48;5;" in out


def test_html_is_self_contained(cl100k, tmp_path):
    page = show.render_html("a <b> & 中文 👋", cl100k, merges=5)
    assert page.startswith("<!doctype html>") and "<b>" not in page and "&lt;" in page and "&amp;" in page
    assert not re.search(r"<script|<link|src=|https?://", page)
    assert 'title="ids ' in page and "11110000 10011111 10010001 10001011" in page   # 👋's bits


def test_merges_of_a_trained_vocabulary(tmp_path):
    from lm.tokenizer import train
    tok = train.train(["the theme then the thesis there"] * 20, 256 + 8 + len(tokenizer.SPECIAL_TOKENS))
    rows = show.merge_rows(tok, 8)
    assert len(rows) == 8 and rows[0][2] == 256
    for parts, token, rank in rows:
        assert len(parts) == 2 and b"".join(parts) == token
        assert all(tok.mergeable_ranks[p] < rank for p in parts)


def test_command_line_writes_html(shared_data, tmp_path):
    page = tmp_path / "tokens.html"
    result = subprocess.run([sys.executable, "-m", "lm.tokenizer.show", "--text=hello world",
                             f"--tokenizer={shared_data(CL100K)}", "--merges=2", f"--html={page}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "15339" in result.stdout and "15339" in page.read_text()


def test_readme_command_loads_cl100k_base_by_name_on_a_default_install(tmp_path):
    """No tiktoken cache, no path: the vocabulary comes from the package setup.py installs."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-m", "lm.tokenizer.show", "--text=hello world 👋",
                             "--tokenizer=cl100k_base", f"--html={tmp_path / 'tokens.html'}"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert "15339 1917 62904 233" in plain and (tmp_path / "tokens.html").is_file()

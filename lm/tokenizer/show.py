"""See text become tokens: UTF-8 bits, bytes (0-255), then coloured token chunks with their ids; and the first merges.

    python -m lm.tokenizer.show --text="hello world 👋" --tokenizer=cl100k_base [--merges=20] [--html=out.html]

Tokens are grouped as in Tiktokenizer: consecutive tokens whose bytes only together form whole characters (an emoji
split into 3 tokens) make one chunk. Whitespace is made visible: space ·, newline ↵, tab →.
"""
import dataclasses
import html

from absl import app, flags

from lm.tokenizer.base import Tokenizer
from lm.tokenizer.reference import bpe_split

_VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}
_ANSI_BACKGROUNDS = (153, 187, 224, 194, 230, 183, 152, 217, 229, 195)
_HTML_BACKGROUNDS = ("#cfe8ff", "#d8f5c6", "#ffd9d2", "#ece0ff", "#fff3bf", "#c9f2ee", "#ffe0f0", "#e6e6e6")


@dataclasses.dataclass(frozen=True)
class Chunk:
    ids: tuple[int, ...]
    text: str


def visible(text: str) -> str:
    """Whitespace and control characters made visible."""
    return "".join(_VISIBLE.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in text)


def show_bytes(data: bytes) -> str:
    """Bytes as visible text; bytes that are not whole UTF-8 characters as \\xNN."""
    return visible(data.decode("utf-8", errors="backslashreplace"))


def utf8_rows(text: str) -> list[tuple[str, int, bytes]]:
    """(character, code point, its UTF-8 bytes) for each character."""
    return [(c, ord(c), c.encode("utf-8", errors="surrogatepass")) for c in text]


def token_chunks(tokenizer: Tokenizer, ids: list[int]) -> list[Chunk]:
    """Group tokens until their bytes decode as whole UTF-8 characters."""
    chunks, pending, data = [], [], b""
    for token_id in ids:
        pending.append(token_id)
        data += tokenizer.token_bytes(token_id)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        chunks.append(Chunk(tuple(pending), text))
        pending, data = [], b""
    if pending:
        chunks.append(Chunk(tuple(pending), data.decode("utf-8", errors="replace")))
    return chunks


def merge_rows(tokenizer: Tokenizer, n: int) -> list[tuple[list[bytes], bytes, int]]:
    """The first n merges: (parts, merged token, id), parts being the tokens BPE joined to make it."""
    ranks = getattr(tokenizer, "mergeable_ranks", None)
    if ranks is None:
        raise ValueError(f"{tokenizer.name} has no BPE ranks to show merges from")
    merged = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)[:n]
    return [(bpe_split(token, ranks, max_rank=rank), token, rank) for rank, token in merged]


# -- terminal ---------------------------------------------------------------------------------------------------------
def _ansi(text: str, index: int) -> str:
    return f"\x1b[48;5;{_ANSI_BACKGROUNDS[index % len(_ANSI_BACKGROUNDS)]}m\x1b[30m{text}\x1b[0m"


def render_terminal(text: str, tokenizer: Tokenizer, merges: int = 0, max_chars: int = 64) -> str:
    ids = tokenizer.encode(text)
    data = text.encode("utf-8", errors="surrogatepass")
    lines = [f"{tokenizer.name} (n_vocab {tokenizer.n_vocab}): {len(text)} characters, {len(data)} UTF-8 bytes, "
             f"{len(ids)} tokens", "", "UTF-8 bits"]
    for c, code, raw in utf8_rows(text[:max_chars]):
        lines.append(f"  {visible(c):>4}  U+{code:04X}  {' '.join(f'{b:08b}' for b in raw)}")
    if len(text) > max_chars:
        lines.append(f"  ... {len(text) - max_chars} more characters")
    lines += ["", "bytes (0-255)", "  " + " ".join(map(str, data[:4 * max_chars])), "", "tokens"]
    chunks = token_chunks(tokenizer, ids)
    lines.append("  " + "".join(_ansi(visible(chunk.text), i) for i, chunk in enumerate(chunks)))
    lines.append("  " + " ".join(_ansi(" ".join(map(str, chunk.ids)), i) for i, chunk in enumerate(chunks)))
    if merges:
        lines += ["", f"first {merges} merges"]
        for parts, token, rank in merge_rows(tokenizer, merges):
            joined = "".join(f"[{show_bytes(p)}]" for p in parts)
            lines.append(f"  {joined} → [{show_bytes(token)}] {rank}")
    return "\n".join(lines)


# -- html -------------------------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
code,.mono,td{font-family:ui-monospace,Menlo,monospace}
.tok{padding:1px 0;border-radius:3px;white-space:pre-wrap;line-height:1.9}
.ids{color:#555;font-size:.85em}table{border-collapse:collapse}td{padding:2px 10px;border-bottom:1px solid #eee}
h2{font-size:1.1em;margin-top:1.6em}"""


def _span(text: str, title: str, index: int) -> str:
    color = _HTML_BACKGROUNDS[index % len(_HTML_BACKGROUNDS)]
    return f'<span class="tok" style="background:{color}" title="{html.escape(title)}">{html.escape(text)}</span>'


def render_html(text: str, tokenizer: Tokenizer, merges: int = 0, max_chars: int = 256) -> str:
    """A self-contained page (inline CSS, no scripts or links)."""
    ids = tokenizer.encode(text)
    data = text.encode("utf-8", errors="surrogatepass")
    chunks = token_chunks(tokenizer, ids)
    bits = "".join(f"<tr><td>{html.escape(visible(c))}</td><td>U+{code:04X}</td>"
                   f"<td>{' '.join(f'{b:08b}' for b in raw)}</td><td>{' '.join(map(str, raw))}</td></tr>"
                   for c, code, raw in utf8_rows(text[:max_chars]))
    tokens = "".join(_span(visible(chunk.text), "ids " + " ".join(map(str, chunk.ids)), i)
                     for i, chunk in enumerate(chunks))
    id_line = " ".join(_span(" ".join(map(str, chunk.ids)), visible(chunk.text), i) for i, chunk in enumerate(chunks))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tokens: {html.escape(tokenizer.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(tokenizer.name)}</h1><p>n_vocab {tokenizer.n_vocab} · {len(text)} characters · "
             f"{len(data)} UTF-8 bytes · {len(ids)} tokens</p>",
             f"<h2>tokens</h2><div>{tokens}</div><p class='ids'>{id_line}</p>",
             "<h2>characters → UTF-8 bits → bytes</h2><table><tr><th>char</th><th>code point</th><th>bits</th>"
             f"<th>bytes</th></tr>{bits}</table>"]
    if len(text) > max_chars:
        parts.append(f"<p>... {len(text) - max_chars} more characters</p>")
    if merges:
        rows = "".join(f"<tr><td>{''.join(f'[{html.escape(show_bytes(p))}]' for p in pieces)}</td><td>→</td>"
                       f"<td>[{html.escape(show_bytes(token))}]</td><td>{rank}</td></tr>"
                       for pieces, token, rank in merge_rows(tokenizer, merges))
        parts.append(f"<h2>first {merges} merges</h2><table>{rows}</table>")
    return "".join(parts) + "</body></html>\n"


# -- command line -----------------------------------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("text", None, "Text to show.")
    flags.DEFINE_string("file", None, "Read the text from this file instead.")
    flags.DEFINE_string("tokenizer", "cl100k_base", "cl100k_base, gpt2, a trained vocabulary directory or a file.")
    flags.DEFINE_integer("merges", 0, "Also show the first N merges of the vocabulary.")
    flags.DEFINE_string("html", None, "Also write a self-contained HTML page here.")


def main(argv):
    del argv
    from lm import tokenizer as tokenizers
    if (FLAGS.text is None) == (FLAGS.file is None):
        raise app.UsageError("give exactly one of --text or --file")
    text = FLAGS.text if FLAGS.text is not None else open(FLAGS.file, encoding="utf-8", errors="replace").read()
    tokenizer = tokenizers.load(FLAGS.tokenizer)
    print(render_terminal(text, tokenizer, FLAGS.merges))
    if FLAGS.html:
        with open(FLAGS.html, "w", encoding="utf-8") as f:
            f.write(render_html(text, tokenizer, FLAGS.merges))
        print(f"\nwrote {FLAGS.html}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

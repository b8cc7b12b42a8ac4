"""The one reader of text files: WARC/WET, HTML, jsonl/json, parquet (FineWeb's schema) and plain text.

Every stage reads through here: the filter through its datatrove reader (`InputReader` in lm.data.filter_readers,
kept apart so that this module, and tokenize / pipeline, need no datatrove), tokenizer training, tokenize and show
through `iter_documents`. One rule for bad input everywhere:

- Bytes that are not valid UTF-8 (and lone surrogates from JSON escapes such as "\\ud800") become U+FFFD. The document
  is kept, and counted and reported with its file and line. HTML and WARC pages are first decoded by the charset
  cchardet detects (as datatrove's WARC reader does); only a page that fits no charset is decoded with replacement.
- Whatever is not a usable document is dropped, counted by reason and reported with its file and line: a malformed
  JSON line (`malformed_json`), a record that is not an object (`malformed_record`), no text field or one that is not
  a string (`missing_text`), blank text (`empty_document`), a .txt file holding NUL bytes (`binary_file`), a WARC
  record that is not HTML (`not_html`), a truncated or unreadable file (`truncated_or_unreadable`, at the line where
  reading stopped; what came before it is kept). Nothing is skipped silently.

A plain-text file is split into documents at blank lines, consecutive paragraphs merged up to `txt_max_chars`
characters (see `split_text`), so a 1 MB book is a few hundred documents rather than one.
"""
import collections
import dataclasses
import glob
import json
import os
import re
import zlib
from typing import Iterator

import fsspec
from absl import logging

HTML = "text/html"
PLAIN = "text/plain"
FINEWEB = "hf://datasets/HuggingFaceFW/fineweb"
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
FORMATS = {".warc": "warc", ".arc": "warc", ".wet": "warc", ".html": "html", ".htm": "html", ".jsonl": "jsonl",
           ".json": "json", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
BLANK_LINE = r"\n\s*\n"     # a line break, then only whitespace up to the next one
TXT_MAX_CHARS = 10_000       # paragraphs of a text file are merged into documents of at most this many characters
WARNINGS_PER_FILE = 10       # bad inputs logged per file and reason; all are counted
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")   # a JSON escape of a surrogate (lone ones need fixing)
MAX_EXAMPLES = 1000          # dropped / replaced inputs kept in full (file, line, ...) in ReadStats


# -- which files ------------------------------------------------------------------------------------------------------
def file_format(path: str) -> str:
    """'warc' | 'html' | 'jsonl' | 'json' | 'parquet' | 'text', from the name (after any compression suffix)."""
    name = os.path.basename(os.fspath(path)).lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith(".warc.wet") or name.endswith(".warc.wat"):
        return "warc"
    ext = os.path.splitext(name)[1]
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown input format {ext!r}; expected one of {sorted(FORMATS)} "
                         f"(optionally compressed: {', '.join(COMPRESSIONS)})")
    return FORMATS[ext]


def expand_inputs(patterns) -> list[str]:
    """Files named by paths, directories (all files below) and globs, each once, in order; `fineweb:sample/10BT` is
    FineWeb on the HF hub. A pattern that matches nothing and a file of unknown format are errors naming them."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files = []
    for pattern in patterns:
        pattern = fineweb_pattern(os.fspath(pattern))
        found = _expand_remote(pattern) if "://" in pattern else _expand_local(pattern)
        if not found:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.extend(found)
    for path in files:
        file_format(path)  # fail early, naming the file
    return list(dict.fromkeys(files))


def fineweb_pattern(pattern: str) -> str:
    """`fineweb:<subset>` (e.g. fineweb:sample/10BT, fineweb:data/CC-MAIN-2024-10) -> the parquet files on the hub."""
    if not pattern.startswith("fineweb:"):
        return pattern
    return f"{FINEWEB}/{pattern.removeprefix('fineweb:').strip('/')}/**/*.parquet"


def _expand_local(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def _expand_remote(pattern: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://")[0]
    return sorted(f"{protocol}://{p}" for p in (fs.glob(path) if glob.has_magic(path) else [path]))


# -- what reading a file yields ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReadOptions:
    text_key: str = "text"              # JSON field / parquet column holding the text
    id_key: str = "id"                  # field holding the id (default id: "<file>:<line>")
    txt_separator: str = BLANK_LINE     # regex between paragraphs of a text file ("": the whole file is a document)
    txt_max_chars: int = TXT_MAX_CHARS  # paragraphs merged up to this size (0: the whole file is a document)


@dataclasses.dataclass
class Record:
    """A document as read: its text, id and the record's other fields, and where it came from."""
    text: str
    id: str
    metadata: dict
    file: str
    line: int                    # 1-based line (jsonl, text), item (json list), row (parquet), record (WARC)
    utf8_replaced: bool = False  # invalid UTF-8 / lone surrogates became U+FFFD


@dataclasses.dataclass
class Bad:
    """An input that is not a usable document: counted and reported as dropped with its reason."""
    reason: str
    line: int                    # where in the file (0: the file as a whole, before any line)
    detail: str = ""
    raw: str = ""


def read_file(path: str, options: ReadOptions = ReadOptions()) -> Iterator[Record | Bad]:
    """Records and Bad items of one file, in file order."""
    kind = file_format(path)
    line = 0
    try:
        for item in _READERS[kind](path, options):
            line = item.line
            yield item
    except damaged_file_errors() as e:
        # what was read before the damage has been yielded; the rest of the file is one dropped item
        yield Bad("truncated_or_unreadable", line, f"{type(e).__name__}: {e}")


def damaged_file_errors() -> tuple[type[Exception], ...]:
    """What reading a truncated or corrupt gzip / WARC / parquet file raises."""
    from pyarrow import ArrowException
    from warcio.recordloader import ArchiveLoadFailed
    return EOFError, OSError, zlib.error, ArchiveLoadFailed, ArrowException


def _record(data, path: str, line: int, options: ReadOptions, replaced: bool = False) -> Record | Bad:
    if not isinstance(data, dict):
        return Bad("malformed_record", line, f"expected an object, got {type(data).__name__}", repr(data)[:10000])
    text = data.get(options.text_key)
    if not isinstance(text, str):
        what = "no field" if text is None else f"{type(text).__name__} in field"
        return Bad("missing_text", line, f"{what} {options.text_key!r}", repr(data)[:10000])
    if not text.strip():
        return Bad("empty_document", line, f"blank text in field {options.text_key!r}", text[:10000])
    text, surrogates = _without_surrogates(text)
    data = dict(data)
    data.pop(options.text_key)
    doc_id = data.pop(options.id_key, None)
    metadata = data.pop("metadata", None) or {}
    metadata = (metadata if isinstance(metadata, dict) else {"metadata": metadata}) | data
    doc_id = str(doc_id) if doc_id not in (None, "") else f"{path}:{line}"
    return Record(text, doc_id, metadata, path, line, replaced or surrogates)


def _without_surrogates(text: str) -> tuple[str, bool]:
    """Lone surrogates (from JSON escapes) cannot be encoded as UTF-8; they become U+FFFD."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True


def utf8(data: bytes) -> tuple[str, bool]:
    """(text, whether invalid UTF-8 bytes were replaced by U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True


def _parse_json(raw: bytes):
    """(value, replaced). orjson is fast but strict: on failure, invalid bytes become U+FFFD and the stdlib parser,
    which takes lone-surrogate escapes, decides. Raises ValueError for malformed JSON."""
    import orjson
    try:
        return orjson.loads(raw), False
    except orjson.JSONDecodeError:
        text, replaced = utf8(raw)
        return json.loads(text), replaced


@dataclasses.dataclass(frozen=True)
class JsonRecord:
    """One JSON value of a file, and where: the 1-based line (JSON lines) or item (a JSON list)."""
    value: object
    line: int
    utf8_replaced: bool = False  # invalid UTF-8 / lone surrogates became U+FFFD somewhere in the value


def json_records(path: str) -> Iterator[JsonRecord | Bad]:
    """Every JSON value of a .jsonl / .ndjson / .json file (optionally compressed), in file order: the one reader of
    JSON records (documents here; conversations and preference pairs in lm.data.conversations / preferences).

    A .json file holding one list (it starts with "[") gives its items, numbered from 1; any other file is JSON
    lines (blank lines skipped). Invalid UTF-8 becomes U+FFFD (`utf8_replaced`). A malformed line is
    Bad("malformed_json", line), a malformed list Bad("malformed_json", 0), and a truncated or unreadable file ends
    with Bad("truncated_or_unreadable", the last line read); nothing is skipped silently.
    """
    path = os.fspath(path)
    line = 0
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            if file_format(path) == "json":
                content = f.read()
                if content.lstrip().startswith(b"["):
                    yield from _json_list(content)
                    return
                lines = iter(content.splitlines())
            else:
                lines = f   # streamed
            for line, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    value, replaced = _parse_json(raw)
                except ValueError as e:
                    yield Bad("malformed_json", line, str(e), raw.decode("utf-8", "replace")[:10000])
                    continue
                surrogates = False
                if SURROGATE_ESCAPE.search(raw):
                    value, surrogates = _value_without_surrogates(value)
                yield JsonRecord(value, line, replaced or surrogates)
    except damaged_file_errors() as e:
        yield Bad("truncated_or_unreadable", line, f"{type(e).__name__}: {e}")


def _json_list(content: bytes) -> Iterator[JsonRecord | Bad]:
    try:
        values, replaced = _parse_json(content)
    except ValueError as e:
        yield Bad("malformed_json", 0, str(e))
        return
    escapes = SURROGATE_ESCAPE.search(content) is not None
    for item, value in enumerate(values, start=1):
        value, surrogates = _value_without_surrogates(value) if escapes else (value, False)
        # replacement happened somewhere in the file: flag the items it reached
        flagged = surrogates or (replaced and "\ufffd" in json.dumps(value, ensure_ascii=False))
        yield JsonRecord(value, item, flagged)


def _value_without_surrogates(value) -> tuple[object, bool]:
    """`value` with lone surrogates in its strings (keys included) replaced by U+FFFD; whether there were any."""
    if isinstance(value, str):
        return _without_surrogates(value)
    if isinstance(value, list):
        pairs = [_value_without_surrogates(v) for v in value]
        return [v for v, _ in pairs], any(r for _, r in pairs)
    if isinstance(value, dict):
        out, any_replaced = {}, False
        for key, item in value.items():
            (key, r1), (item, r2) = _without_surrogates(key), _value_without_surrogates(item)
            out[key] = item
            any_replaced = any_replaced or r1 or r2
        return out, any_replaced
    return value, False


def _read_json(path: str, options: ReadOptions):
    """JSON lines, or one JSON list of objects (see `json_records`)."""
    for item in json_records(path):
        yield item if isinstance(item, Bad) else _record(item.value, path, item.line, options, item.utf8_replaced)


def _read_parquet(path: str, options: ReadOptions):
    import pyarrow.parquet as pq
    with fsspec.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if options.text_key not in parquet.schema_arrow.names:
            yield Bad("missing_text", 0, f"no column {options.text_key!r} (columns: {parquet.schema_arrow.names})")
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=1000):
            for data in batch.to_pylist():
                row += 1
                yield _record(data, path, row, options)


def _read_text(path: str, options: ReadOptions):
    with fsspec.open(path, "rb", compression="infer") as f:
        content = f.read()
    if b"\x00" in content[:1 << 16]:
        yield Bad("binary_file", 0, "NUL bytes: not a text file", content[:1000].decode("utf-8", "replace"))
        return
    text, replaced = utf8(content)
    pieces = split_text(text, options.txt_separator, options.txt_max_chars)
    if not pieces:
        yield Bad("empty_document", 0, "blank text file", text[:10000])
    for line, piece in pieces:
        doc_id = path if len(pieces) == 1 else f"{path}:{line}"
        yield _record({"text": piece, "id": doc_id, "content_type": PLAIN}, path, line, options,
                      replaced and "\ufffd" in piece)


def split_text(text: str, separator: str = BLANK_LINE, max_chars: int = TXT_MAX_CHARS) -> list[tuple[int, str]]:
    """(first line, text) of the documents of a plain-text file.

    The text is cut only where `separator` (a regex; default: a blank line) matches; consecutive paragraphs are merged
    while the document stays within max_chars. A paragraph longer than max_chars is cut at line breaks instead (a
    single line longer than that stays whole). Each document is an exact slice of the file (the separators between
    paragraphs of one document kept); the separators between documents are dropped. With separator "" or
    max_chars <= 0 the whole file is one document.
    """
    if not text.strip():
        return []
    if not separator or max_chars <= 0:
        return [(1, text)]
    spans = []
    start = 0
    for match in re.finditer(separator, text):
        spans += _cut_long(text, start, match.start(), max_chars)
        start = match.end()
    spans += _cut_long(text, start, len(text), max_chars)
    documents = []
    for begin, end in spans:
        if not text[begin:end].strip():
            continue
        if documents and end - documents[-1][0] <= max_chars:
            documents[-1][1] = end
        else:
            documents.append([begin, end])
    lines, line, position = [], 1, 0
    for begin, _ in documents:
        line += text.count("\n", position, begin)
        position = begin
        lines.append(line)
    return [(line, text[begin:end]) for line, (begin, end) in zip(lines, documents)]


def _cut_long(text: str, begin: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """[begin, end) as one span, or as lines when it is longer than max_chars (merged again by the caller)."""
    if end - begin <= max_chars:
        return [(begin, end)]
    spans, start = [], begin
    while start < end:
        stop = text.find("\n", start, end)
        stop = end if stop < 0 else stop + 1
        spans.append((start, stop))
        start = stop
    return spans


def _read_html(path: str, options: ReadOptions):
    with fsspec.open(path, "rb", compression="infer") as f:
        content = f.read()
    text, note = decode(content)
    yield _record({"text": text, "id": path, "content_type": HTML}, path, 1, options, bool(note))


def _read_warc(path: str, options: ReadOptions):
    from warcio.archiveiterator import ArchiveIterator
    with fsspec.open(path, "rb") as f:
        for number, record in enumerate(ArchiveIterator(f), start=1):
            if record.rec_type not in ("response", "conversion"):
                continue  # requests, metadata and warcinfo records are not pages
            yield _warc_page(record, path, number, options)
    if path.endswith(".gz"):
        # warcio stops quietly at a truncated gzip member; reading the stream to its end raises EOFError
        with fsspec.open(path, "rb", compression="gzip") as f:
            while f.read(1 << 22):
                pass


def _warc_page(record, path: str, number: int, options: ReadOptions):
    headers = record.rec_headers
    is_wet = record.rec_type == "conversion"
    mime = headers.get_header("WARC-Identified-Payload-Type")
    content = record.content_stream().read()
    if mime is None and not is_wet:
        import magic
        mime = magic.from_buffer(content, mime=True)
    if not is_wet and mime not in (HTML, "application/xhtml+xml"):
        return Bad("not_html", number, f"{headers.get_header('WARC-Target-URI')}: {mime}")
    text, note = decode(content)
    data = {"text": text, "id": headers.get_header("WARC-Record-ID"), "url": headers.get_header("WARC-Target-URI"),
            "date": headers.get_header("WARC-Date"), "content_type": PLAIN if is_wet else HTML}
    return _record(data, path, number, options, bool(note))


def decode(content: bytes) -> tuple[str, str]:
    """(text, note) of a web page: UTF-8, else the charset cchardet detects (as datatrove's WARC reader does), else
    UTF-8 with invalid bytes replaced by U+FFFD; note is "" unless bytes were replaced, and then says why."""
    try:
        return content.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        error = str(e)
    import cchardet
    charset = cchardet.detect(content)["encoding"]
    if charset and charset.lower().replace("-", "") != "utf8":
        try:
            return content.decode(charset), ""
        except (UnicodeDecodeError, LookupError) as e:
            error = f"{charset}: {e}"
    return content.decode("utf-8", "replace"), f"not UTF-8 and no charset fits ({error})"


_READERS = {"jsonl": _read_json, "json": _read_json, "parquet": _read_parquet, "text": _read_text,
            "html": _read_html, "warc": _read_warc}


# -- reading many files: tokenizer training, tokenize, show -----------------------------------------------------------
@dataclasses.dataclass
class ReadStats:
    """What iter_documents read, replaced and dropped; the first MAX_EXAMPLES of each kept with file and line."""
    files: int = 0
    documents: int = 0
    characters: int = 0
    utf8_replaced: int = 0           # documents kept with U+FFFD in place of invalid UTF-8 / lone surrogates
    dropped: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_examples: list = dataclasses.field(default_factory=list)    # {"file", "line", "reason", "detail"}
    replaced_examples: list = dataclasses.field(default_factory=list)   # {"file", "line"}

    def add(self, item: Record | Bad, path: str) -> None:
        if isinstance(item, Bad):
            self.dropped += 1
            self.by_reason[item.reason] += 1
            if len(self.dropped_examples) < MAX_EXAMPLES:
                self.dropped_examples.append(dict(file=path, line=item.line, reason=item.reason, detail=item.detail))
            return
        self.documents += 1
        self.characters += len(item.text)
        if item.utf8_replaced:
            self.utf8_replaced += 1
            if len(self.replaced_examples) < MAX_EXAMPLES:
                self.replaced_examples.append(dict(file=path, line=item.line))

    def to_dict(self) -> dict:
        return dict(files=self.files, documents=self.documents, characters=self.characters,
                    utf8_replaced=self.utf8_replaced, dropped=self.dropped, by_reason=dict(self.by_reason),
                    dropped_examples=list(self.dropped_examples), replaced_examples=list(self.replaced_examples))

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.by_reason.most_common()) or "none"
        return (f"{self.documents} documents ({self.characters / 1e6:.1f}M characters) from {self.files} files; "
                f"{self.utf8_replaced} with invalid UTF-8 replaced; {self.dropped} dropped ({reasons})")


def iter_documents(inputs, stats: ReadStats | None = None, options: ReadOptions | None = None,
                   **option_values) -> Iterator[Record]:
    """The Records of every file named by `inputs` (paths, directories, globs), in order. What is dropped or has
    its UTF-8 replaced is counted in `stats` and logged (the first few per file) with file and line.
    Options: a ReadOptions, or its fields as keywords (text_key="question")."""
    stats = ReadStats() if stats is None else stats
    options = options or ReadOptions(**option_values)
    for path in expand_inputs(inputs):
        stats.files += 1
        warned = collections.Counter()
        for item in read_file(path, options):
            stats.add(item, path)
            if isinstance(item, Bad):
                _warn(warned, item.reason, f"{path}:{item.line}: dropped ({item.reason}) {item.detail}".rstrip())
                continue
            if item.utf8_replaced:
                _warn(warned, "utf8_replaced", f"{path}:{item.line}: invalid UTF-8 replaced by U+FFFD")
            yield item


def _warn(warned: collections.Counter, kind: str, message: str) -> None:
    warned[kind] += 1
    if warned[kind] <= WARNINGS_PER_FILE:
        logging.warning("%s", message)


def texts(inputs, stats: ReadStats | None = None, **option_values) -> Iterator[str]:
    """Just the texts of iter_documents (what tokenizer training reads)."""
    return (record.text for record in iter_documents(inputs, stats, **option_values))

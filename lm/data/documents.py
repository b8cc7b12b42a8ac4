"""Read text documents from .jsonl(.gz), .json(.gz), .parquet and .txt(.gz) files, counting what is rejected and why.

Every document that is not yielded is recorded in a DocumentStats with (file, line, reason): malformed JSON, a
missing or non-string text field, empty text, an unreadable or unsupported file. Invalid UTF-8 (and lone surrogates
in JSON escapes) is replaced with U+FFFD and counted, not dropped.
"""
import collections
import dataclasses
import glob
import gzip
import json
import os
import pathlib
import zlib
from typing import Iterable, Iterator

try:
    import orjson
    _json_loads = orjson.loads
except ImportError:  # orjson is only faster
    _json_loads = json.loads

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt", ".txt.gz")


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str   # file
    line: int     # 1-based line (jsonl), item (json list), row (parquet); 1 for a whole .txt file


@dataclasses.dataclass(frozen=True)
class Rejection:
    source: str
    line: int     # 0: the whole file
    reason: str


@dataclasses.dataclass
class DocumentStats:
    """Counts of what was read, replaced and rejected; keeps the first max_examples rejections in full."""
    files: int = 0
    documents: int = 0
    characters: int = 0
    replaced_utf8: int = 0            # documents whose invalid UTF-8 / lone surrogates became U+FFFD
    rejected: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)
    max_examples: int = 1000

    def reject(self, source, line: int, reason: str) -> None:
        self.rejected += 1
        self.by_reason[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(Rejection(str(source), line, reason))

    def to_dict(self) -> dict:
        return dict(files=self.files, documents=self.documents, characters=self.characters,
                    replaced_utf8=self.replaced_utf8, rejected=self.rejected, by_reason=dict(self.by_reason),
                    examples=[dataclasses.asdict(r) for r in self.examples])

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.by_reason.most_common()) or "none"
        return (f"{self.documents} documents ({self.characters / 1e6:.1f}M characters) from {self.files} files; "
                f"{self.replaced_utf8} with invalid UTF-8 replaced; {self.rejected} rejected ({reasons})")


def expand(paths_or_globs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """Files named by paths, globs and directories (searched recursively), each once, in a stable order."""
    if isinstance(paths_or_globs, (str, os.PathLike)):
        paths_or_globs = [paths_or_globs]
    files = []
    for entry in map(str, paths_or_globs):
        if os.path.isdir(entry):
            found = sorted(p for p in pathlib.Path(entry).rglob("*") if p.is_file())
        elif glob.has_magic(entry):
            found = [pathlib.Path(p) for p in sorted(glob.glob(entry, recursive=True)) if os.path.isfile(p)]
            if not found:
                raise FileNotFoundError(f"no files match {entry!r}")
        elif os.path.isfile(entry):
            found = [pathlib.Path(entry)]
        else:
            raise FileNotFoundError(f"no such file or directory: {entry!r}")
        files.extend(found)
    return list(dict.fromkeys(files))


def iter_documents(paths_or_globs, text_key: str = "text", stats: DocumentStats | None = None) -> Iterator[Document]:
    """Documents from every file in order; pass a DocumentStats to see what was read and rejected."""
    stats = DocumentStats() if stats is None else stats
    for path in expand(paths_or_globs):
        stats.files += 1
        reader = _reader(path)
        if reader is None:
            stats.reject(path, 0, f"unsupported format: not one of {', '.join(SUFFIXES)}")
            continue
        line = 0
        try:
            for line, text in reader(path, text_key, stats):
                stats.documents += 1
                stats.characters += len(text)
                yield Document(text, str(path), line)
        except (OSError, EOFError, ValueError, zlib.error) as error:  # gzip/zlib/parquet corruption, permissions
            stats.reject(path, line, f"unreadable file: {type(error).__name__}: {error}")


def _reader(path: pathlib.Path):
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return _read_json
    if name.endswith(".parquet"):
        return _read_parquet
    if name.endswith((".txt", ".txt.gz")):
        return _read_txt
    return None


def _open(path: pathlib.Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(data: bytes, stats: DocumentStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.replaced_utf8 += 1
        return data.decode("utf-8", errors="replace")


def _valid_text(value, source, line: int, text_key: str, stats: DocumentStats) -> str | None:
    """The document's text, or None after recording why it is rejected."""
    if not isinstance(value, dict):
        stats.reject(source, line, f"not a JSON object: {type(value).__name__}")
        return None
    if text_key not in value:
        stats.reject(source, line, f"missing key: {text_key!r}")
        return None
    return _valid_string(value[text_key], source, line, stats)


def _valid_string(text, source, line: int, stats: DocumentStats) -> str | None:
    if not isinstance(text, str):
        stats.reject(source, line, f"text not a string: {type(text).__name__}")
        return None
    if not text:
        stats.reject(source, line, "empty text")
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes such as "\ud800"
        stats.replaced_utf8 += 1
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _parse_json(data: str):
    try:
        return _json_loads(data)
    except ValueError:
        return json.loads(data)  # stricter orjson rejects lone-surrogate escapes that json accepts


def _read_json(path: pathlib.Path, text_key: str, stats: DocumentStats):
    """JSON lines; a .json(.gz) file that starts with "[" is one JSON list of objects."""
    with _open(path) as f:
        if path.name.lower().endswith((".json", ".json.gz")) and f.peek(64).lstrip()[:1] == b"[":
            items = enumerate(_parse_list(path, _decode(f.read(), stats)), 1)
        else:
            items = _jsonl_items(path, f, stats)
        for line, value in items:
            text = _valid_text(value, path, line, text_key, stats)
            if text is not None:
                yield line, text


def _parse_list(path: pathlib.Path, data: str) -> list:
    try:
        value = _parse_json(data)
    except ValueError as error:
        raise ValueError(f"malformed JSON list: {error}") from None
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list of objects, got {type(value).__name__}")
    return value


def _jsonl_items(path: pathlib.Path, f, stats: DocumentStats):
    for line, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            yield line, _parse_json(_decode(raw, stats))
        except ValueError as error:
            stats.reject(path, line, f"malformed JSON: {error}")


def _read_parquet(path: pathlib.Path, text_key: str, stats: DocumentStats):
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(path)
    if text_key not in parquet.schema_arrow.names:
        raise ValueError(f"no column {text_key!r} (columns: {parquet.schema_arrow.names})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _valid_string(value, path, row, stats)
            if text is not None:
                yield row, text


def _read_txt(path: pathlib.Path, text_key: str, stats: DocumentStats):
    with _open(path) as f:
        text = _valid_string(_decode(f.read(), stats), path, 1, stats)
    if text is not None:
        yield 1, text

"""Input readers for the filter recipe: WARC/WET, HTML, jsonl/json, parquet (FineWeb's schema) and plain text.

Unlike datatrove's own readers, which log and skip what they cannot read, every bad input (a truncated file, a page
that is not UTF-8 and whose charset cannot be detected, an empty document, a malformed jsonl line) is counted in the
reader's stats as `dropped_<reason>` and written, with its file and line, to the reader's exclusion writer.
"""
import contextlib
import dataclasses
import glob
import os
import time
import zlib

import fsspec
from datatrove.data import Document
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseReader
from datatrove.utils.logging import logger

HTML = "text/html"
PLAIN = "text/plain"
FINEWEB = "hf://datasets/HuggingFaceFW/fineweb"
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
FORMATS = {".warc": "warc", ".arc": "warc", ".wet": "warc", ".html": "html", ".htm": "html", ".jsonl": "jsonl",
           ".json": "json", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
PROGRESS_SECONDS = 30
WARNINGS_PER_FILE = 10  # bad inputs logged per file and reason; all are counted and written


def file_format(path: str) -> str:
    """'warc' | 'html' | 'jsonl' | 'json' | 'parquet' | 'text', from the name (after any compression suffix)."""
    name = os.path.basename(path).lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith(".warc.wet") or name.endswith(".warc.wat"):
        return "warc"
    ext = os.path.splitext(name)[1]
    if ext not in FORMATS:
        raise ValueError(f"{path}: unknown input format {ext!r}; expected one of {sorted(FORMATS)} "
                         f"(optionally compressed: {', '.join(COMPRESSIONS)})")
    return FORMATS[ext]


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (all files below) and globs; `fineweb:sample/10BT` is FineWeb on the HF hub."""
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


@dataclasses.dataclass
class Bad:
    """An input that is not a usable document: counted and written as dropped with its reason."""
    reason: str
    line: int
    detail: str = ""
    raw: str = ""


class InputReader(BaseReader):
    """Reads a fixed list of files of any supported format.

    Task `rank` of `world_size` reads files[rank::world_size]; with fewer files than tasks, every task reads all files
    and keeps every world_size-th item, so a single file is still processed in parallel.
    """

    name = "📖 Inputs"

    def __init__(self, files: list[str], exclusion_writer=None, text_key="text", id_key="id", limit: int = -1):
        super().__init__(limit=limit, text_key=text_key, id_key=id_key)
        self.files = list(files)
        self.exclusion_writer = exclusion_writer

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        by_file = len(self.files) >= world_size
        files = self.files[rank::world_size] if by_file else self.files
        count, index = 0, 0
        with self.exclusion_writer or contextlib.nullcontext() as writer:
            for path in files:
                self.stat_update("input_files")
                logger.info(f"Reading {path}")
                last_log = time.monotonic()
                for item in self.read_file(path):
                    index += 1
                    if not by_file and (index - 1) % world_size != rank:
                        continue
                    if self.limit != -1 and count >= self.limit:
                        return
                    count += 1
                    if isinstance(item, Bad):
                        self._drop(item, path, writer, rank)
                        continue
                    self.stat_update("documents")
                    self.stat_update("bytes", value=len(item.text.encode("utf-8")))
                    self.update_doc_stats(item)
                    if time.monotonic() - last_log > PROGRESS_SECONDS:
                        logger.info(f"{path}: {count} items read by task {rank}")
                        last_log = time.monotonic()
                    yield item

    def _drop(self, bad: Bad, path: str, writer, rank: int):
        self.stat_update("documents", "dropped", f"dropped_{bad.reason}", f"bad_input::{bad.reason}::{path}")
        self.stat_update("bytes", value=len(bad.raw.encode("utf-8", "replace")))
        if self.stats[f"bad_input::{bad.reason}::{path}"].total <= WARNINGS_PER_FILE:
            logger.warning(f"{path}:{bad.line}: {bad.reason} {bad.detail}".rstrip())
        if writer:
            meta = {"file": path, "line": bad.line, "filter_reason": bad.reason, "detail": bad.detail}
            writer.write(Document(text=bad.raw, id=f"{path}:{bad.line}", metadata=meta), rank)

    def read_file(self, path: str):
        """Yields Documents and Bad items, in file order."""
        kind = file_format(path)
        try:
            yield from getattr(self, f"_read_{kind}")(path)
        except damaged_file_errors() as e:
            # what was read before the damage has been yielded; the rest of the file is one dropped item
            yield Bad("truncated_or_unreadable", -1, f"{type(e).__name__}: {e}")

    def _document(self, data: dict, path: str, line: int):
        if not isinstance(data, dict):
            return Bad("malformed_record", line, f"expected an object, got {type(data).__name__}")
        text = data.get(self.text_key)
        if not isinstance(text, str) or not text.strip():
            return Bad("empty_document", line, f"no text in field {self.text_key!r}")
        data = dict(data)
        data.pop(self.text_key)
        doc_id = data.pop(self.id_key, None) or f"{path}:{line}"
        metadata = data.pop("metadata", None) or {}
        metadata = (metadata if isinstance(metadata, dict) else {"metadata": metadata}) | data
        return Document(text=text, id=str(doc_id), metadata=metadata)

    def _read_jsonl(self, path):
        import orjson
        with fsspec.open(path, "rb", compression="infer") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    data = orjson.loads(line)  # orjson rejects invalid UTF-8, so this also catches non-UTF-8 lines
                except orjson.JSONDecodeError as e:
                    reason = "not_utf8" if "utf-8" in str(e).lower() else "malformed_json"
                    yield Bad(reason, line_number, str(e), line.decode("utf-8", "replace")[:10000])
                    continue
                yield self._document(data, path, line_number)

    def _read_json(self, path):
        import orjson
        with fsspec.open(path, "rb", compression="infer") as f:
            content = f.read()
        if not content.lstrip().startswith(b"["):
            yield from self._read_jsonl(path)
            return
        try:
            records = orjson.loads(content)
        except orjson.JSONDecodeError as e:
            yield Bad("malformed_json", 0, str(e))
            return
        for i, data in enumerate(records):
            yield self._document(data, path, i)

    def _read_parquet(self, path):
        import pyarrow.parquet as pq
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            row = 0
            for batch in parquet.iter_batches(batch_size=1000):
                for data in batch.to_pylist():
                    yield self._document(data, path, row)
                    row += 1

    def _read_text(self, path):
        yield self._whole_file(path, PLAIN)

    def _read_html(self, path):
        yield self._whole_file(path, HTML)

    def _whole_file(self, path, content_type):
        with fsspec.open(path, "rb", compression="infer") as f:
            content = f.read()
        text, error = decode(content)
        if text is None:
            return Bad("not_utf8", 0, error, content[:10000].decode("utf-8", "replace"))
        return self._document({"text": text, "id": path, "content_type": content_type}, path, 0)

    def _read_warc(self, path):
        from warcio.archiveiterator import ArchiveIterator
        with fsspec.open(path, "rb") as f:
            for number, record in enumerate(ArchiveIterator(f), start=1):
                if record.rec_type not in ("response", "conversion"):
                    continue  # requests, metadata and warcinfo records are not pages
                yield self._warc_page(record, path, number)
        if path.endswith(".gz"):
            # warcio stops quietly at a truncated gzip member; reading the stream to its end raises EOFError
            with fsspec.open(path, "rb", compression="gzip") as f:
                while f.read(1 << 22):
                    pass

    def _warc_page(self, record, path, number):
        headers = record.rec_headers
        is_wet = record.rec_type == "conversion"
        mime = headers.get_header("WARC-Identified-Payload-Type")
        content = record.content_stream().read()
        if mime is None and not is_wet:
            import magic
            mime = magic.from_buffer(content, mime=True)
        if not is_wet and mime not in (HTML, "application/xhtml+xml"):
            return Bad("not_html", number, f"{headers.get_header('WARC-Target-URI')}: {mime}")
        text, error = decode(content)
        if text is None:
            return Bad("not_utf8", number, f"{headers.get_header('WARC-Target-URI')}: {error}")
        data = {"text": text, "id": headers.get_header("WARC-Record-ID"), "url": headers.get_header("WARC-Target-URI"),
                "date": headers.get_header("WARC-Date"), "content_type": PLAIN if is_wet else HTML}
        return self._document(data, path, number)


def damaged_file_errors() -> tuple[type[Exception], ...]:
    """What reading a truncated or corrupt gzip / WARC / parquet file raises."""
    from pyarrow import ArrowException
    from warcio.recordloader import ArchiveLoadFailed
    return EOFError, OSError, zlib.error, ArchiveLoadFailed, ArrowException


def decode(content: bytes) -> tuple[str | None, str]:
    """UTF-8, else the charset cchardet detects (as datatrove's WARC reader does); (None, why) when neither works."""
    try:
        return content.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        error = str(e)
    import cchardet
    charset = cchardet.detect(content)["encoding"]
    if not charset or charset.lower().replace("-", "") == "utf8":
        return None, error
    try:
        return content.decode(charset), ""
    except (UnicodeDecodeError, LookupError) as e:
        return None, f"{charset}: {e}"


class StagedReader(JsonlReader):
    """Reads back exactly the shard task `rank` wrote (`<rank>.jsonl`), so MinHash document indices line up."""

    name = "🐿 Staged shard"

    def __init__(self, folder: str):
        super().__init__(folder, add_file_path=False)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl"
        if not self.data_folder.isfile(name):
            return
        for doc in self.read_files_shard([name]):
            self.update_doc_stats(doc)
            yield doc


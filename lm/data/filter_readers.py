"""The filter's datatrove readers: lm.data.readers' reader as a datatrove pipeline step (`InputReader`) and the
reader of a staged shard (`StagedReader`). Apart from lm.data.readers so that only the filter needs datatrove."""
import contextlib
import time

from datatrove.data import Document as DatatroveDocument
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseReader
from datatrove.utils.logging import logger as datatrove_logger

from lm.data.readers import BLANK_LINE, TXT_MAX_CHARS, WARNINGS_PER_FILE, Bad, ReadOptions, read_file

PROGRESS_SECONDS = 30      # a progress line per file at most this often


class InputReader(BaseReader):
    """lm.data.readers.read_file as a datatrove pipeline step: yields datatrove Documents; dropped inputs are counted as
    `dropped_<reason>` / `bad_input::<reason>::<file>` and written, with file and line, to the exclusion writer;
    documents kept with replaced UTF-8 are counted as `utf8_replaced` / `utf8_replaced::<file>`.

    Task `rank` of `world_size` reads files[rank::world_size]; with fewer files than tasks, every task reads all files
    and keeps every world_size-th item, so a single file is still processed in parallel.
    """

    name = "📖 Inputs"

    def __init__(self, files: list[str], exclusion_writer=None, text_key="text", id_key="id", limit: int = -1,
                 txt_separator: str = BLANK_LINE, txt_max_chars: int = TXT_MAX_CHARS):
        super().__init__(limit=limit, text_key=text_key, id_key=id_key)
        self.files = list(files)
        self.exclusion_writer = exclusion_writer
        self.options = ReadOptions(text_key, id_key, txt_separator, txt_max_chars)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        by_file = len(self.files) >= world_size
        files = self.files[rank::world_size] if by_file else self.files
        count, index = 0, 0
        with self.exclusion_writer or contextlib.nullcontext() as writer:
            for path in files:
                self.stat_update("input_files")
                datatrove_logger.info(f"Reading {path}")
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
                        datatrove_logger.info(f"{path}: {count} items read by task {rank}")
                        last_log = time.monotonic()
                    yield item

    def _drop(self, bad: Bad, path: str, writer, rank: int):
        self.stat_update("documents", "dropped", f"dropped_{bad.reason}", f"bad_input::{bad.reason}::{path}")
        self.stat_update("bytes", value=len(bad.raw.encode("utf-8", "replace")))
        if self.stats[f"bad_input::{bad.reason}::{path}"].total <= WARNINGS_PER_FILE:
            datatrove_logger.warning(f"{path}:{bad.line}: {bad.reason} {bad.detail}".rstrip())
        if writer:
            meta = {"file": path, "line": bad.line, "filter_reason": bad.reason, "detail": bad.detail}
            writer.write(DatatroveDocument(text=bad.raw, id=f"{path}:{bad.line}", metadata=meta), rank)

    def read_file(self, path: str):
        """datatrove Documents and Bad items of one file, in file order."""
        for item in read_file(path, self.options):
            if isinstance(item, Bad):
                yield item
                continue
            if item.utf8_replaced:
                self.stat_update("utf8_replaced", f"utf8_replaced::{path}")
                if self.stats[f"utf8_replaced::{path}"].total <= WARNINGS_PER_FILE:
                    datatrove_logger.warning(f"{path}:{item.line}: invalid UTF-8 replaced by U+FFFD")
            yield DatatroveDocument(text=item.text, id=item.id, metadata=item.metadata)


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


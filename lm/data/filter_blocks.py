"""datatrove's blocks, made to run offline and to leave a trace of every document they drop.

Only what the recipe needs differs from datatrove: the language filter reads a local fastText model (and accepts
fasttext-predict), the URL filter uses tldextract's bundled suffix list and reads its blocklist straight from the
tarball, the HTML extractor writes the pages it drops, and `Tally` counts what leaves each block for the report.
"""
import contextlib
import importlib.util
import os
import tarfile

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.extractors.trafilatura import Trafilatura
from datatrove.pipeline.filters import language_filter, url_filter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils._import_utils import ASSETS_PATH
from datatrove.utils.lid import FT176LID
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints

from lm.data import readers

BLOCKLIST = os.path.join(ASSETS_PATH, "url_filterblacklistsv0_3_0.tar.gz")
# The reason written for drops of blocks that give none of their own.
DEFAULT_REASON = {"language": "not_language", "minhash": "near_duplicate"}


class URLFilter(url_filter.URLFilter):
    """datatrove's URL filter, offline: the public-suffix list bundled with tldextract (no fetch), the blocklist read
    straight from its tarball (nothing extracted to a cache), and documents without a URL passed on (counted)."""

    def __init__(self, blocklist: str = BLOCKLIST, **kwargs):
        from tldextract import TLDExtract
        super().__init__(**kwargs)
        self.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)
        self.blocklist = blocklist

    def download_data(self):
        if self._downloaded or not self.use_integrated_lists:
            return
        logger.info(f"Loading the URL blocklist from {self.blocklist}")
        with tarfile.open(self.blocklist, "r:gz") as tar:
            domains, urls = (_read_list(tar.extractfile(member).read()) for member in ("domains", "urls"))
        domains.update(self.block_listed_domains)  # the config's extra domains / urls
        urls.update(self.block_listed_url)
        self.block_listed_domains, self.block_listed_url = domains, urls
        for name, target in (("banned_words.txt", self.banned_words), ("banned_subwords.txt", self.banned_subwords),
                             ("soft_banned_words.txt", self.soft_banned_words)):
            target.update(url_filter.get_list(ASSETS_PATH, name, set()))
        for word in self.banned_subwords:
            self.banned_subwords_automaton.add_word(word, len(self.banned_subwords_automaton))
        self.banned_subwords_automaton.make_automaton()
        self._downloaded = True

    def filter(self, document: Document):
        if not document.metadata.get("url"):
            self.stat_update("no_url")
            return True
        return super().filter(document)


def _read_list(data: bytes) -> set[str]:
    """datatrove's parse_list (strip, skip comments) for a blocklist member; a plain split when nothing needs
    stripping, which is twice as fast on the 4.5M domains each worker loads."""
    if any(c in data for c in (b"#", b" ", b"\t", b"\r")):
        return url_filter.parse_list([line for line in data.decode("utf-8").splitlines() if line],
                                     do_normalize=False)
    result = set(data.decode("utf-8").split("\n"))
    result.discard("")
    return result


class _ArrayScores:
    """fasttext-predict returns scores as floats; datatrove's LID calls `.item()` on them."""

    def __init__(self, model):
        self.model = model

    def predict(self, text, k=-1):
        import numpy as np
        labels, scores = self.model.predict(text, k=k)
        return labels, np.asarray(scores)


class LocalLID(FT176LID):
    """datatrove's fastText language ID reading a local model file instead of downloading lid.176.bin."""

    def __init__(self, languages, model_path: str):
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText
            self._model = _ArrayScores(_FastText(self.model_path))
        return self._model


class LanguageFilter(language_filter.LanguageFilter):
    """datatrove's language filter with a local model. datatrove checks for the `fasttext-numpy2-wheel` distribution;
    `fasttext-predict` provides the same `fasttext` module, so only the module is checked here."""

    def __new__(cls, *args, **kwargs):
        if importlib.util.find_spec("fasttext") is None:
            raise ImportError("LanguageFilter needs a `fasttext` module: pip install fasttext-predict")
        return object.__new__(cls)

    def __init__(self, model: str, languages, language_threshold: float = 0.65, exclusion_writer=None):
        super().__init__(languages=list(languages), language_threshold=language_threshold,
                         exclusion_writer=exclusion_writer)
        self.model = LocalLID(self.languages, model)


class Extract(PipelineStep):
    """datatrove's Trafilatura on HTML documents (others pass unchanged). datatrove's extractor drops failed pages
    without a trace; this runs the same sandboxed extraction and writes what it drops, with the reason."""

    type = "🛢 - EXTRAC"
    name = "⛏ Trafilatura"

    def __init__(self, exclusion_writer=None, timeout: float = 1.0, **trafilatura_args):
        super().__init__()
        self.extractor = Trafilatura(timeout=timeout, **trafilatura_args)
        self.exclusion_writer = exclusion_writer

    def run(self, data, rank: int = 0, world_size: int = 1):
        with (ExtractorSandbox(timeout=self.extractor.timeout) as sandbox,
              self.exclusion_writer or contextlib.nullcontext() as writer):
            for doc in data:
                if doc.metadata.get("content_type") != readers.HTML:
                    self.stat_update("already_text")
                    yield doc
                    continue
                self.stat_update(StatHints.total)
                reason = self._extract(sandbox, doc)
                if reason is None:
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped, f"dropped_{reason}")
                    if writer:
                        doc.metadata["filter_reason"] = reason
                        writer.write(doc, rank)

    def _extract(self, sandbox, doc) -> str | None:
        """Replaces doc.text by the extracted text, or returns why not (the HTML is kept for the dropped record)."""
        with self.track_time():
            try:
                text = sandbox.process_document(doc.text, self.extractor.extract)
            except TimeoutError:
                return "extract_timeout"
            except EOFError:
                return "extractor_died"
            except Exception as e:  # noqa: BLE001 - trafilatura's errors on odd pages are many and unexported
                logger.warning(f"extraction failed for {doc.id}: {e!r}")
                return "extract_error"
        if not text:
            return "no_text"
        doc.text = text
        doc.metadata["content_type"] = readers.PLAIN
        return None


class Tally(PipelineStep):
    """Counts the documents and UTF-8 bytes that leave a block; the report is built from these."""

    type = "📊 - TALLY"

    def __init__(self, block: str):
        self.name = block  # before super().__init__, which names the stats after the step
        super().__init__()

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("documents")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            yield doc


class DroppedWriter(JsonlWriter):
    """The exclusion writer of one block: dropped/<block>/<rank>.jsonl.gz, each record with `filter_reason`."""

    def __init__(self, folder: str, block: str):
        super().__init__(folder)
        self.block = block

    def _default_adapter(self, document: Document) -> dict:
        document.metadata.setdefault("filter_reason", DEFAULT_REASON.get(self.block, self.block))
        document.metadata["filter_block"] = self.block
        return super()._default_adapter(document)

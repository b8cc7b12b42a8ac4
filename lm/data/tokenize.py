"""Tokenize a corpus into token shards: `<tokens_dir>/{train,val}/NNNNN.bin` + `index.json`.

Each shard is a flat little-endian array of token ids (uint16 when the vocabulary fits, else uint32) in which every
document is followed by the end-of-text token, plus `NNNNN.docs.bin` (uint64): the offset of each document's first
token in the shard. Shards are filled in document order and closed at a document boundary once they hold
`shard_tokens` tokens; the output does not depend on the number of workers, and a re-run on the same input writes
byte-identical files.

The split: a document goes to val when the first 8 bytes of blake2b(its UTF-8 text) read as a fraction of 2**64 fall
below `val_fraction`, so the split is deterministic and duplicates land on the same side. With val_fraction > 0, a
split that rule leaves empty while the other has at least 2 documents takes the other's last document, so a corpus
of 2 or more documents always has a usable val split (one document: at least 2 tokens, one window) and a train split.
When that is impossible (1 document, or val_fraction 0) index.json says so (`split.val_usable` false) and
`has_val(index)` is False, so training can skip evaluation.

Conversations (`write_conversations`, for SFT) use the same shards with one more stream per shard:
`NNNNN.mask.bin` (uint8, one value per token) is render_conversation's loss_mask, 1 on the tokens the model learns
to predict (the assistant's thinking, answer and end token). Each conversation is one document (it starts with the
begin token and ends with its last turn's end token, no end-of-text appended), the splits are the caller's (SFT:
"train" and one held-out split per source), and index.json says `loss_mask: true` and the `pad_id` that
lm.data.pipeline's `document` packing fills rows with. Shards without a mask stream (pretraining) read as all ones.

Documents come from lm.data.readers (jsonl / json / parquet / txt / html / warc, optionally compressed; .txt files
split at blank lines, see `txt_separator` / `txt_max_chars`); whatever it drops (unreadable file, malformed line,
missing or empty text) is counted and listed in the index with file and line, documents in = tokenized + rejected,
and documents whose invalid UTF-8 was replaced are counted and listed too. Inputs that give no document are an error
naming them.

    python -m lm.data.tokenize --config=configs/tiny.py --workdir=runs/tiny [--input=<files or globs>]
"""
import collections
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import app, flags, logging

from lm import progress as lm_progress
from lm.data import conversations as lm_conversations
from lm.data import readers
from lm.tokenizer import chat

INDEX_FILE = "index.json"
FORMAT = "lm.tokens/1"
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 18           # text per worker task: small enough to balance, large enough to amortise
DEFAULTS = dict(val_fraction=0.05, shard_tokens=1 << 24, workers=0, text_key="text",
                txt_separator=readers.BLANK_LINE, txt_max_chars=readers.TXT_MAX_CHARS)
SPLIT_RULE = ("blake2b(utf-8 text, 8 bytes) / 2**64 < val_fraction; with val_fraction > 0, a split left empty takes "
              "the other split's last document when that one has at least 2")


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32).newbyteorder("<")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_val(text_bytes: bytes, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0 ** 64


def has_val(index: dict) -> bool:
    """Whether the val split has a document to evaluate on (training skips evaluation, with a warning, if not)."""
    return index["splits"]["val"]["documents"] > 0


def read_index(tokens_dir) -> dict:
    path = pathlib.Path(tokens_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m lm.data.tokenize` first")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r} is not {FORMAT!r}; re-run lm.data.tokenize")
    return index


class ShardWriter:
    """Appends documents to `<directory>/NNNNN.bin` (and, with masks=True, their loss masks to NNNNN.mask.bin),
    starting a new shard past shard_tokens."""

    def __init__(self, tokens_dir: pathlib.Path, split: str, shard_tokens: int, masks: bool = False):
        self.tokens_dir, self.split, self.shard_tokens, self.masks = tokens_dir, split, shard_tokens, masks
        (tokens_dir / split).mkdir(parents=True, exist_ok=True)
        self.shards = []
        self._file = None

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        if (mask is not None) != self.masks or (mask is not None and len(mask) != len(tokens)):
            raise ValueError(f"{self.split}: a document needs a mask of its length exactly when the shards have one")
        if self._file is None:
            self._open()
        self._starts.append(self._tokens)
        self._file.write(tokens.tobytes())
        if self.masks:
            self._mask_file.write(np.asarray(mask, np.uint8).tobytes())
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._close()

    def _open(self):
        name = f"{self.split}/{len(self.shards):05d}"
        self._names = dict(tokens_file=f"{name}.bin", docs_file=f"{name}.docs.bin")
        if self.masks:
            self._names["mask_file"] = f"{name}.mask.bin"
            self._mask_file = open(self.tokens_dir / self._names["mask_file"], "wb")
        self._file = open(self.tokens_dir / self._names["tokens_file"], "wb")
        self._starts, self._tokens = [], 0

    def _close(self):
        self._file.close()
        self._file = None
        if self.masks:
            self._mask_file.close()
        (self.tokens_dir / self._names["docs_file"]).write_bytes(np.asarray(self._starts, "<u8").tobytes())
        self.shards.append(dict(self._names, tokens=self._tokens, documents=len(self._starts)))

    def finish(self) -> dict:
        if self._file is not None:
            self._close()
        return dict(tokens=sum(s["tokens"] for s in self.shards), documents=sum(s["documents"] for s in self.shards),
                    shards=self.shards)


class Splits:
    """Sends each document to train or val by the hash rule, holding the latest document of each split back so that
    at the end a split the rule left empty can take the other split's last one (see the module docstring)."""

    def __init__(self, writers: dict, val_fraction: float):
        self.writers, self.val_fraction = writers, val_fraction
        self.pending = {split: None for split in SPLITS}   # (tokens, "file:line") not yet written
        self.counts = {split: 0 for split in SPLITS}
        self.moved = None

    def add(self, split: str, tokens: np.ndarray, where: str) -> None:
        if self.pending[split] is not None:
            self.writers[split].add(self.pending[split][0])
        self.pending[split] = (tokens, where)
        self.counts[split] += 1

    def finish(self) -> dict:
        if self.val_fraction > 0:
            for empty, full in (("val", "train"), ("train", "val")):
                if self.counts[empty] == 0 and self.counts[full] >= 2:
                    self.pending[empty], self.pending[full] = self.pending[full], None
                    self.counts[empty], self.counts[full] = 1, self.counts[full] - 1
                    self.moved = dict(document=self.pending[empty][1], moved_from=full, moved_to=empty)
        for split, held in self.pending.items():
            if held is not None:
                self.writers[split].add(held[0])
        return {split: writer.finish() for split, writer in self.writers.items()}


def _chunks(docs, chunk_chars: int):
    """Lists of documents of about chunk_chars characters each, in order."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(tokenizer, texts, dtype, eot_id: int, val_fraction: float):
    """[(is_val, tokens + eot as dtype)] and the chunk's UTF-8 bytes; runs in a worker thread."""
    out, n_bytes = [], 0
    for text in texts:
        data = text.encode("utf-8")
        n_bytes += len(data)
        ids = tokenizer.encode(text)
        tokens = np.empty(len(ids) + 1, dtype)
        tokens[:-1] = ids
        tokens[-1] = eot_id
        out.append((is_val(data, val_fraction), tokens))
    return out, n_bytes


def _ordered(pool, chunks, submit, depth: int):
    """Results of submit(chunk) in chunk order, with at most `depth` chunks in flight."""
    pending = collections.deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(submit, chunk)))
        if len(pending) >= depth:
            chunk, future = pending.popleft()
            yield chunk, future.result()
    while pending:
        chunk, future = pending.popleft()
        yield chunk, future.result()


def run(tokenizer, inputs, tokens_dir, dataset_config=None) -> dict:
    """Tokenizes the documents of `inputs` (paths, directories or globs) into `tokens_dir`; returns the index (also
    written as index.json, last, so a directory with an index is complete). No document at all is an error."""
    given = dataset_config.to_dict() if hasattr(dataset_config, "to_dict") else dict(dataset_config or {})
    cfg = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
    tokens_dir = pathlib.Path(tokens_dir)
    workers = cfg["workers"] or available_cores()
    dtype = token_dtype(tokenizer.n_vocab)
    eot_id = tokenizer.eot_id
    _clear(tokens_dir)
    splits = Splits({split: ShardWriter(tokens_dir, split, cfg["shard_tokens"]) for split in SPLITS},
                    cfg["val_fraction"])
    stats = readers.ReadStats()
    per_source = collections.Counter()
    progress = _Progress()

    def encode(chunk):
        return _encode_chunk(tokenizer, [d.text for d in chunk], dtype, eot_id, cfg["val_fraction"])

    options = readers.ReadOptions(text_key=cfg["text_key"], txt_separator=cfg["txt_separator"],
                                  txt_max_chars=cfg["txt_max_chars"])
    docs = readers.iter_documents(inputs, stats, options)
    with ThreadPoolExecutor(workers) as pool:
        for chunk, (encoded, n_bytes) in _ordered(pool, _chunks(docs, CHUNK_CHARS), encode, 2 * workers):
            for doc, (val, tokens) in zip(chunk, encoded):
                splits.add("val" if val else "train", tokens, f"{doc.file}:{doc.line}")
                per_source[doc.file] += 1
            progress.update(len(chunk), n_bytes, sum(len(tokens) for _, tokens in encoded))
    progress.finish()
    if not per_source:
        names = ", ".join(map(str, [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs))
        raise ValueError(f"no documents to tokenize in {names}: {stats.summary()}")
    index = _index(tokenizer, dtype, cfg, splits, stats, per_source)
    _write_json(tokens_dir / INDEX_FILE, index)
    logging.info("tokenized %s", stats.summary())
    if splits.moved:
        logging.warning("%s: the split rule left %s empty; it takes %s from %s", tokens_dir, splits.moved["moved_to"],
                        splits.moved["document"], splits.moved["moved_from"])
    if not has_val(index):
        logging.warning("%s: the val split is empty (%d documents, val_fraction=%s): training cannot evaluate",
                        tokens_dir, sum(per_source.values()), cfg["val_fraction"])
    return {**index, "seconds": round(progress.seconds, 2), "mb_per_s": round(progress.mb_per_s, 2)}


def write_conversations(tokenizer, splits: dict, tokens_dir, seq_len: int,
                        shard_tokens: int = DEFAULTS["shard_tokens"]) -> dict:
    """Renders each split's conversations (name -> Conversations or message lists, in order) with
    chat.render_conversation into token + loss-mask shards in tokens_dir; returns the index (written last).

    seq_len is the length of the rows lm.data.pipeline cuts them into (seq_len + 1 ids): a longer conversation is
    kept whole in the shards and counted as truncated; one with no supervised target inside the row would teach
    nothing, so it is dropped and counted (first ones listed with file:line). A conversation that is not valid is an
    error naming it (chat.ConversationError)."""
    tokens_dir = pathlib.Path(tokens_dir)
    dtype, pad = token_dtype(tokenizer.n_vocab), chat.pad_id(tokenizer)
    _clear(tokens_dir, splits)
    progress = lm_progress.Progress("tokenize conversations", unit="conversations")
    written, stats = {}, {}
    for split, items in splits.items():
        writer = ShardWriter(tokens_dir, split, shard_tokens, masks=True)
        counts = _ConversationCounts(seq_len, pad)
        for n, item in enumerate(items):
            messages, where = ((item.messages, item.where) if isinstance(item, lm_conversations.Conversation)
                               else (item, f"{split} conversation {n}"))
            ids, mask = chat.render_conversation(tokenizer, messages, where=where)
            if counts.add(ids, mask, where):
                writer.add(np.asarray(ids, dtype), np.asarray(mask, np.uint8))
            progress.advance()
        written[split], stats[split] = writer.finish(), counts.to_dict()
    progress.close()
    index = {"format": FORMAT, "dtype": dtype.name, "loss_mask": True, "pad_id": pad, "seq_len": seq_len,
             "tokenizer": _tokenizer_info(tokenizer), "splits": written, "conversations": stats}
    _write_json(tokens_dir / INDEX_FILE, index)
    return index


class _ConversationCounts:
    """What write_conversations did with one split's conversations, as rows of seq_len + 1 ids will see them."""
    MAX_EXAMPLES = 20

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.counts = dict.fromkeys(("conversations", "truncated", "dropped_no_supervised_token", "tokens",
                                     "supervised_tokens", "supervised_tokens_before_cut"), 0)
        self.dropped = []

    def add(self, ids, mask, where: str) -> bool:
        """Counts one rendered conversation; False when it is dropped (no supervised target in its row)."""
        row = self.seq_len + 1
        supervised = sum(mask[1:row])            # the loss of target t is the mask of token t + 1
        self.counts["conversations"] += 1
        self.counts["supervised_tokens_before_cut"] += sum(mask[1:])
        self.counts["truncated"] += len(ids) > row
        if not supervised:
            self.counts["dropped_no_supervised_token"] += 1
            if len(self.dropped) < self.MAX_EXAMPLES:
                self.dropped.append(where)
            return False
        self.counts["tokens"] += min(len(ids), row)
        self.counts["supervised_tokens"] += supervised
        return True

    def to_dict(self) -> dict:
        rows = self.counts["conversations"] - self.counts["dropped_no_supervised_token"]
        padding = round(1 - self.counts["tokens"] / (rows * (self.seq_len + 1)), 4) if rows else 0.0
        return dict(self.counts, rows=rows, seq_len=self.seq_len, pad_id=self.pad_id, padding_fraction=padding,
                    dropped=self.dropped)


def _clear(tokens_dir: pathlib.Path, splits=SPLITS):
    """Removes a previous run's index first (so a half-written directory never looks complete), then its shards:
    those of `splits` and of every split the old index names."""
    tokens_dir.mkdir(parents=True, exist_ok=True)
    old = set()
    try:
        old = set(json.loads((tokens_dir / INDEX_FILE).read_text()).get("splits", ()))
    except (OSError, ValueError, AttributeError):   # no index, or not ours: nothing more to remove
        pass
    (tokens_dir / INDEX_FILE).unlink(missing_ok=True)
    for split in set(splits) | old:
        if split and "/" not in split and split not in (".", ".."):
            shutil.rmtree(tokens_dir / split, ignore_errors=True)


def _index(tokenizer, dtype, cfg, splits: Splits, stats: readers.ReadStats, per_source) -> dict:
    tokenized = sum(per_source.values())
    written = splits.finish()
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": _tokenizer_info(tokenizer),
        "split": dict(val_fraction=cfg["val_fraction"], rule=SPLIT_RULE, moved=splits.moved,
                      val_usable=written["val"]["documents"] > 0),
        "splits": written,
        "documents": {"in": tokenized + stats.dropped, "tokenized": tokenized, "rejected": stats.dropped,
                      "utf8_replaced": stats.utf8_replaced},
        "sources": [{"file": source, "documents": n} for source, n in per_source.items()],
        "files": stats.files,
        "rejected_by_reason": dict(stats.by_reason),
        "rejected": stats.dropped_examples,
        "utf8_replaced": stats.replaced_examples,
    }


def _tokenizer_info(tokenizer) -> dict:
    return dict(name=tokenizer.name, hash=tokenizer.hash, n_vocab=tokenizer.n_vocab, eot_id=tokenizer.eot_id)


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class _Progress:
    """Documents, bytes and tokens so far, shown by an lm.progress line (documents counted; the total is unknown
    before the end, so there is a rate but no ETA)."""

    def __init__(self):
        self.line = lm_progress.Progress("tokenize", unit="documents")
        self.docs = self.bytes = self.tokens = 0

    def update(self, docs, n_bytes, tokens):
        self.docs += docs
        self.bytes += n_bytes
        self.tokens += tokens
        self.line.update(self.docs, note=f"{self.bytes / 1e6:,.1f} MB ({self.mb_per_s:.2f} MB/s), "
                                         f"{self.tokens:,} tokens")

    @property
    def seconds(self):
        return time.monotonic() - self.line.started

    @property
    def mb_per_s(self):
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def finish(self):
        self.line.close()
        logging.info("tokenized %d documents, %.1f MB, %d tokens, %.1f s (%.2f MB/s)", self.docs, self.bytes / 1e6,
                     self.tokens, self.seconds, self.mb_per_s)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lm import tokenizer as lm_tokenizer
    config = flags.FLAGS.config
    workdir = pathlib.Path(flags.FLAGS.workdir)
    inputs = flags.FLAGS.input or [str(workdir / "text" / "*.jsonl.gz")]
    tok = lm_tokenizer.load(flags.FLAGS.tokenizer or workdir / "tokenizer")
    try:
        index = run(tok, inputs, workdir / "tokens", config.dataset)
    except (ValueError, FileNotFoundError) as error:   # no documents, no such input: the message says which
        sys.exit(f"lm.data.tokenize: {error}")
    docs = index["documents"]
    print(f"{docs['in']} documents in: {docs['tokenized']} tokenized, {docs['rejected']} rejected "
          f"{index['rejected_by_reason'] or ''}")
    for split, info in index["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens in {len(info['shards'])} shards")
    print(f"{index['dtype']} shards in {workdir / 'tokens'}; {index['mb_per_s']} MB/s")


if __name__ == "__main__":
    from lm import config as lm_config
    lm_config.define_config_flag()
    flags.DEFINE_string("workdir", "runs/default", "Workdir: reads tokenizer/ and text/, writes tokens/.")
    flags.DEFINE_list("input", [], "Files or globs of documents (default: <workdir>/text/*.jsonl.gz).")
    flags.DEFINE_string("tokenizer", None, "Tokenizer name or path (default: <workdir>/tokenizer).")
    app.run(main)

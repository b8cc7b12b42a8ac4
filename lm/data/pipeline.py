"""The input pipeline: index-addressable windows of token shards, batched per process with tf.data.

The batch for global step `s` is a pure function of (seed, s, process index). Slot `j = s * global_batch + row` of the
global batch stream takes window `feistel(j mod n_windows)` of epoch `j // n_windows`, through a seeded Feistel
permutation (no table, any domain size), so a run started at step `s` yields exactly the batches an uninterrupted run
would have seen: no iterator state to checkpoint, nothing to replay.

Packing:
  concat    window k is tokens [k * seq_len, k * seq_len + seq_len + 1) of the split's stream; windows cross document
            boundaries (documents are separated by the end-of-text token); loss_mask is all ones.
  document  window k starts at document k's first token and ends at its last token (a corpus document's end-of-text)
            or after seq_len + 1 tokens (a longer document is cut); the rest of the row is padded with `pad_id`
            (default: the index's pad_id, else the end-of-text id) and loss_mask is 1 exactly where the target is a
            token of the document (its closing end-of-text included), 0 on padding. One document per row, so no row
            attends across two documents: this is how SFT reads conversations (lm.data.tokenize.write_conversations).

Shards with a loss-mask stream (conversations) multiply that loss_mask by the stream's value of each target token
(the assistant's tokens are 1, the rest 0); shards without one (pretraining) read as all ones.

TensorFlow is imported only here, lazily, and kept off accelerators; the window arithmetic is numpy, so it is usable
(and tested) without TensorFlow.

    python -m lm.data.pipeline --config=configs/tiny.py --workdir=runs/tiny [--steps=100]
"""
import atexit
import json
import pathlib
import sys
import threading
import time
import weakref

import numpy as np
from absl import app, flags, logging

from lm.data import tokenize

PACKINGS = ("concat", "document")
FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1


# --- Token shards --------------------------------------------------------------------------------------------------

class TokenData:
    """One split of a tokenized corpus as one token stream over memory-mapped shards."""

    def __init__(self, tokens_dir, split: str = "train"):
        self.tokens_dir = pathlib.Path(tokens_dir)
        self.split = split
        self.index = tokenize.read_index(self.tokens_dir)
        if split not in self.index["splits"]:
            raise ValueError(f"{self.tokens_dir / tokenize.INDEX_FILE}: no split {split!r}; "
                             f"known: {sorted(self.index['splits'])}")
        self.dtype = np.dtype(self.index["dtype"])
        self.eot_id = int(self.index["tokenizer"]["eot_id"])
        self.pad_id = int(self.index.get("pad_id", self.eot_id))
        shards = self.index["splits"][split]["shards"]
        self.shards = [self._open(shard["tokens_file"], self.dtype, shard["tokens"]) for shard in shards]
        self.masks = ([self._open(shard["mask_file"], np.uint8, shard["tokens"]) for shard in shards]
                      if self.index.get("loss_mask") else None)   # None: every token is learnt
        self._doc_files = [(shard["docs_file"], shard["documents"]) for shard in shards]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        self.n_documents = sum(n for _, n in self._doc_files)
        self._doc_starts = None

    def _open(self, name, dtype, count):
        path = self.tokens_dir / name
        size = path.stat().st_size if path.exists() else -1
        if size != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: expected {count} values of {np.dtype(dtype).name} "
                             f"({count * np.dtype(dtype).itemsize} bytes), found {size} bytes; re-run lm.data.tokenize")
        return np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype)

    @property
    def doc_starts(self) -> np.ndarray:
        """Global stream offset of every document's first token (int64), with n_tokens appended."""
        if self._doc_starts is None:
            parts = [self._open(name, np.uint64, n).astype(np.int64) + offset
                     for (name, n), offset in zip(self._doc_files, self.offsets[:-1])]
            self._doc_starts = np.concatenate(parts + [np.array([self.n_tokens], np.int64)])
        return self._doc_starts

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries."""
        return self._read(self.shards, start, length)

    def read_mask(self, start: int, length: int) -> np.ndarray:
        """The loss-mask stream's values (uint8) of tokens [start, start + length); all ones without a stream."""
        if self.masks is None:
            return np.ones(length, np.uint8)
        return self._read(self.masks, start, length)

    def _read(self, arrays, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the {self.split} stream of {self.n_tokens}")
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[shard])
        if local + length <= len(arrays[shard]):
            return arrays[shard][local:local + length]
        pieces = []
        while length > 0:
            piece = arrays[shard][local:local + length]
            pieces.append(piece)
            length -= len(piece)
            shard, local = shard + 1, 0
        return np.concatenate(pieces)


# --- Windows and the permutation -----------------------------------------------------------------------------------

def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each element (uint64 arrays, wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def round_keys(seed: int, epoch: int, rounds: int = FEISTEL_ROUNDS) -> np.ndarray:
    """Per-round keys derived from (seed, epoch)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    base = _mix64(np.array([seed & _MASK64], np.uint64))
    base = _mix64(base ^ (np.array([epoch & _MASK64], np.uint64) * golden))
    return _mix64(base + np.arange(1, rounds + 1, dtype=np.uint64) * golden)


def feistel_permute(x, n: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, n) applied to `x`: a balanced Feistel network on the smallest even number of bits that
    covers n, cycle-walked (re-applied until the value falls inside [0, n), which always terminates on a permutation).
    """
    x = np.asarray(x, np.uint64)
    if n < 1 or np.any(x >= n):
        raise ValueError(f"feistel_permute: values must lie in [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    y = _feistel(x, half, keys)
    outside = y >= n
    while outside.any():
        y[outside] = _feistel(y[outside], half, keys)
        outside = y >= n
    return y.astype(np.int64)


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
        left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << np.uint64(half)) | right


class Windows:
    """Windows of at most seq_len + 1 tokens over one split, addressed by index (see the module docstring)."""

    def __init__(self, data: TokenData, seq_len: int, packing: str = "concat", keep_tail: bool = False, pad_id=None):
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}: must be one of {PACKINGS}")
        self.data, self.seq_len, self.packing = data, seq_len, packing
        self.pad_id = data.pad_id if pad_id is None else int(pad_id)
        if packing == "document":
            self.n = data.n_documents
            data.doc_starts   # loaded now, not by the first of several tf.data threads
        elif keep_tail:   # validation: the last, shorter window too, so every target token is scored once
            self.n = -(-(data.n_tokens - 1) // seq_len) if data.n_tokens > 1 else 0
        else:
            self.n = (data.n_tokens - 1) // seq_len if data.n_tokens > 1 else 0
        if self.n < 1:
            raise ValueError(f"{data.tokens_dir}: the {data.split} split ({data.n_tokens} tokens, "
                             f"{data.n_documents} documents) has no window of seq_len + 1 = {seq_len + 1} tokens")

    def bounds(self, ids: np.ndarray):
        """(start, length) in the stream of each window id."""
        ids = np.asarray(ids, np.int64)
        if self.packing == "document":
            starts = self.data.doc_starts[ids]
            ends = self.data.doc_starts[ids + 1]
        else:
            starts = ids * self.seq_len
            ends = np.full_like(starts, self.data.n_tokens)
        return starts, np.minimum(ends - starts, self.seq_len + 1)

    def batch(self, ids: np.ndarray, valid=None) -> dict:
        """{"inputs", "targets": int32 [len(ids), seq_len], "loss_mask": float32}; rows where `valid` is False are
        all padding with a zero mask."""
        rows = np.full((len(ids), self.seq_len + 1), self.pad_id, np.int32)
        mask = np.zeros((len(ids), self.seq_len), np.float32)
        starts, lengths = self.bounds(ids)
        for row, (start, length) in enumerate(zip(starts, lengths)):
            if valid is None or valid[row]:
                rows[row, :length] = self.data.read(int(start), int(length))
                mask[row, :length - 1] = self.data.read_mask(int(start) + 1, int(length) - 1)   # of each target
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": mask}


def local_rows(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
    """Row numbers of the global batch fed by one process (a contiguous block, as lm.mesh.host_local_rows)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    per_process = global_batch // process_count
    return np.arange(process_index * per_process, (process_index + 1) * per_process, dtype=np.int64)


def train_window_ids(step: int, n_windows: int, global_batch: int, seed: int, rows: np.ndarray) -> np.ndarray:
    """Window ids of the given rows of step `step`: each epoch of n_windows slots is one seeded permutation."""
    slots = np.int64(step) * global_batch + rows
    epochs, positions = np.divmod(slots, n_windows)
    ids = np.empty_like(positions)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        ids[where] = feistel_permute(positions[where], n_windows, round_keys(seed, int(epoch)))
    return ids


def train_batch(windows: Windows, step: int, global_batch: int, seed: int, process_index: int = 0,
                process_count: int = 1) -> dict:
    """This process's rows of the batch for `step` (numpy; what the tf.data pipeline yields)."""
    rows = local_rows(global_batch, process_index, process_count)
    return windows.batch(train_window_ids(step, windows.n, global_batch, seed, rows))


def val_batch(windows: Windows, index: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> dict:
    """Rows of validation batch `index`: windows in order; rows past the last window are padding (mask 0)."""
    ids = index * batch_size + local_rows(batch_size, process_index, process_count)
    valid = ids < windows.n
    return windows.batch(np.where(valid, ids, 0), valid=valid)


def num_val_batches(windows: Windows, batch_size: int) -> int:
    return -(-windows.n // batch_size)


# --- tf.data -------------------------------------------------------------------------------------------------------

def import_tensorflow():
    """TensorFlow, imported on first use, with every GPU hidden from it so it never takes accelerator memory."""
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices were initialised already (by an earlier call): they were hidden then
        pass
    return tf


class _Shutdown:
    """tf.data runs make_batch (a numpy_function) on its own threads. An iterator still alive when the interpreter
    finalizes has those threads call into a Python that is going away, and the process then hangs or aborts
    ("terminate called without an active exception": 1 to 3 of 4 exits of a script that kept one iterator). So
    every iterator is registered, and at exit, while Python still runs, the live ones are released, later calls
    refused and the calls in flight waited for."""
    live = weakref.WeakSet()
    calls = threading.Condition()
    in_flight = 0
    closing = False

    @classmethod
    def call(cls, fn, *args):
        with cls.calls:
            if cls.closing:
                raise RuntimeError("lm.data.pipeline: the interpreter is exiting")
            cls.in_flight += 1
        try:
            return fn(*args)
        finally:
            with cls.calls:
                cls.in_flight -= 1
                cls.calls.notify_all()

    @classmethod
    def release(cls, timeout: float = 10.0) -> None:
        with cls.calls:
            cls.closing = True
        for batches in list(cls.live):
            batches.close()
        with cls.calls:
            cls.calls.wait_for(lambda: cls.in_flight == 0, timeout)


atexit.register(_Shutdown.release)


class Batches:
    """Iterator of a tf.data pipeline's batches as numpy dicts; close() releases the pipeline (done for every live
    one at exit)."""

    def __init__(self, dataset):
        self._iterator = dataset.as_numpy_iterator()
        _Shutdown.live.add(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        self._iterator = None


def _dataset(make_batch, first: int, stop: int, batch_rows: int, seq_len: int, prefetch: int):
    """tf.data over Dataset.range(first, stop) mapped through `make_batch(index) -> dict of numpy`."""
    tf = import_tensorflow()
    keys = ("inputs", "targets", "loss_mask")
    dtypes = (tf.int32, tf.int32, tf.float32)

    def as_tuple(index):
        batch = _Shutdown.call(make_batch, int(index))
        return tuple(batch[k] for k in keys)

    def map_fn(index):
        values = tf.numpy_function(as_tuple, [index], dtypes, stateful=False)
        return {k: tf.ensure_shape(v, (batch_rows, seq_len)) for k, v in zip(keys, values)}

    dataset = tf.data.Dataset.range(first, stop)
    dataset = dataset.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(prefetch if prefetch > 0 else tf.data.AUTOTUNE)


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def train_batches(tokens_dir, seq_len: int, global_batch: int, seed: int, start_step: int = 0, process_index=None,
                  process_count=None, packing: str = "concat", num_steps=None, pad_id=None, prefetch: int = 0):
    """Iterator of this process's rows of the train batches for steps start_step, start_step + 1, ...

    Yields {"inputs", "targets": int32 [global_batch / process_count, seq_len], "loss_mask": float32 [same]}.
    Process index and count default to jax's; pad_id (document packing) defaults to the index's (see Windows).
    """
    process_index, process_count = _process(process_index, process_count)
    windows = Windows(TokenData(tokens_dir, "train"), seq_len, packing, pad_id=pad_id)
    n_rows = len(local_rows(global_batch, process_index, process_count))
    stop = sys.maxsize if num_steps is None else start_step + num_steps

    def make_batch(step):
        return train_batch(windows, step, global_batch, seed, process_index, process_count)

    return Batches(_dataset(make_batch, start_step, stop, n_rows, seq_len, prefetch))


def val_batches(tokens_dir, seq_len: int, batch_size: int, process_index=None, process_count=None,
                packing: str = "concat", max_batches=None, pad_id=None, prefetch: int = 0, split: str = "val"):
    """Deterministic iterator over a held-out split, each target token scored once (document packing: each
    document's first window once). The last batch is padded with rows whose loss_mask is 0, so every batch has the
    same shape and every process runs the same number of batches."""
    process_index, process_count = _process(process_index, process_count)
    windows = Windows(TokenData(tokens_dir, split), seq_len, packing, keep_tail=True, pad_id=pad_id)
    n_batches = num_val_batches(windows, batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    n_rows = len(local_rows(batch_size, process_index, process_count))

    def make_batch(index):
        return val_batch(windows, index, batch_size, process_index, process_count)

    return Batches(_dataset(make_batch, 0, n_batches, n_rows, seq_len, prefetch))


# --- CLI -----------------------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    tokens_dir = pathlib.Path(flags.FLAGS.workdir) / "tokens"
    train = config.train
    packing = config.dataset.get("packing", "concat")
    index = tokenize.read_index(tokens_dir)
    logging.info("%s: %s", tokens_dir, json.dumps({s: {k: v for k, v in info.items() if k != "shards"}
                                                     for s, info in index["splits"].items()}))
    batches = train_batches(tokens_dir, train.seq_len, train.batch_size, config.seed, packing=packing,
                            process_index=0, process_count=1)
    first = next(batches)
    start = time.perf_counter()
    for _ in range(flags.FLAGS.steps):
        next(batches)
    seconds = time.perf_counter() - start
    tokens = flags.FLAGS.steps * first["inputs"].size
    print(f"{packing} packing, batch {first['inputs'].shape}: {flags.FLAGS.steps} steps in {seconds:.2f}s, "
          f"{tokens / seconds:,.0f} tokens/s")
    print("step 0, row 0, first 32 tokens:", first["inputs"][0, :32].tolist())


if __name__ == "__main__":
    from lm import config as lm_config
    lm_config.define_config_flag()
    flags.DEFINE_string("workdir", "runs/default", "Workdir holding tokens/ (from lm.data.tokenize).")
    flags.DEFINE_integer("steps", 100, "Batches to time.")
    app.run(main)


def unigram_loss(tokens_dir) -> float | None:
    """Cross-entropy (nats/token) of the val split under the train split's unigram distribution (add-one smoothed):
    the loss a model that ignores context gets, the baseline a language model must beat. None without a val split."""
    train, val = TokenData(tokens_dir, "train"), TokenData(tokens_dir, "val")
    if val.n_tokens == 0:
        return None
    n_vocab = int(train.index["tokenizer"]["n_vocab"])
    counts = np.ones(n_vocab, np.float64)
    for shard in train.shards:
        counts += np.bincount(shard, minlength=n_vocab)[:n_vocab]
    log_probs = np.log(counts / counts.sum())
    total = sum(float(log_probs[shard].sum()) for shard in val.shards)
    return -total / max(val.n_tokens, 1)

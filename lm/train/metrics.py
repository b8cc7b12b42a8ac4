"""Training metrics: <workdir>/metrics.jsonl + TensorBoard (tensorboardX), device peak FLOP/s for MFU, loss plots."""
import functools
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from absl import logging

# Dense bf16 peak FLOP/s per chip, matched against `device.device_kind` (lower case, first match wins).
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12), ("a10", 125e12),
    ("v6", 918e12), ("v5p", 459e12), ("v5", 197e12), ("v4", 275e12),
)


@functools.cache
def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on this process's first device (the CPU 'peak' for MFU), best of `repeats`."""
    on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    x = jax.jit(lambda: jnp.ones((n, n), jnp.float32), out_shardings=on_device)()
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


@functools.cache
def peak_flops() -> float:
    """Peak FLOP/s of all devices together: a table for accelerators; on CPU one measured matmul per process (virtual
    CPU devices share their host's cores; each process is taken to be a host of its own)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        peak = measured_matmul_flops() * jax.process_count()
        logging.info("CPU peak (measured float32 matmul x %d processes): %.1f GFLOP/s", jax.process_count(), peak / 1e9)
        return peak
    kind = device.device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops * jax.device_count()
    logging.warning("unknown device kind %r: measuring a matmul for the MFU peak", device.device_kind)
    return measured_matmul_flops(8192) * jax.device_count()


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard (process 0 only).

    On resume from step s the files hold exactly one curve: lines for steps after s (written before a kill) are
    dropped from metrics.jsonl, as is a partial last line (what a kill mid-write leaves), with a warning naming the
    file; and tb/ is rewritten from metrics.jsonl (keeping each event's original wall time where tb/ still has it)
    into one event file holding each step once. `flush()` (the Trainer calls it at every checkpoint) puts the
    TensorBoard events on disk.
    """

    def __init__(self, workdir, resume_step: int | None = None, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _truncate_after(self.path, resume_step or 0)
        self._file = self.path.open("a")
        if tensorboard:
            self._tb = _rebuilt_tensorboard(pathlib.Path(workdir) / "tb", kept)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            _add_scalars(self._tb, record)

    def flush(self) -> None:
        if self.active and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def _add_scalars(writer, record: dict, walltimes: dict | None = None) -> None:
    """The record's numbers as one TensorBoard event of the step (walltimes: {(tag, step): wall time} of a
    rebuilt file). One event, not one per scalar: each event is a queue put to the writer's thread, ~40 us each,
    which a small model's train step (tens of ms, ~20 scalars) felt."""
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import scalar

    step = record["step"]
    numbers = {key: value for key, value in record.items()
               if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if not numbers:
        return
    summary = Summary(value=[v for key, value in numbers.items() for v in scalar(key, value).value])
    walltime = (walltimes or {}).get((next(iter(numbers)), step))
    writer._get_file_writer().add_summary(summary, step, walltime)  # what add_scalar does, for all tags at once


def _tensorboard_writer(logdir):
    """tensorboardX's SummaryWriter (TensorFlow's tf.summary needs the tensorboard package, which is not here)."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:  # tensorboardX imports torch (seconds) only to accept torch tensors; we log floats
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")
        return None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir), flush_secs=10)


def _rebuilt_tensorboard(logdir: pathlib.Path, records: list[dict]):
    """A SummaryWriter on `logdir` whose one event file holds `records` (each step once); older event files are
    read for their wall times, then removed (metrics.jsonl is the record they were written from)."""
    old = sorted(logdir.glob("events.out.tfevents.*")) if logdir.is_dir() else []
    walltimes = {}
    for path in old:
        walltimes.update(read_scalar_events(path, walltimes=True))
    for path in old:
        path.unlink()
    writer = _tensorboard_writer(logdir)
    if writer is not None and records:
        for record in records:
            _add_scalars(writer, record, walltimes)
        writer.flush()
        logging.info("%s: rewrote %d steps from metrics.jsonl (%d old event files replaced)", logdir, len(records),
                     len(old))
    return writer


def read_scalar_events(path, walltimes: bool = False) -> dict:
    """{(tag, step): value} (or wall time) of the scalar events of a TensorBoard event file, read without
    TensorFlow. A truncated last record (a kill mid-write) ends the reading; events of a step written twice keep
    the last."""
    from tensorboardX.proto import event_pb2

    out = {}
    data = pathlib.Path(path).read_bytes()
    at = 0
    while at + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
        length = int.from_bytes(data[at:at + 8], "little")
        if at + 12 + length + 4 > len(data):
            break
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out[(value.tag, int(event.step))] = event.wall_time if walltimes else value.simple_value
    return out


def _parse_lines(path: pathlib.Path) -> list[dict]:
    """The records of metrics.jsonl. A bad last line (cut short by a kill mid-write) is dropped with a warning
    naming the file; a bad line elsewhere is an error naming the file and line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as error:
            if number == len(lines):
                logging.warning("%s:%d: dropping a partial last line (a run killed while writing it?): %r",
                                path, number, line[:80])
                break
            raise ValueError(f"{path}:{number}: not a metrics record ({error}): {line[:80]!r}") from None
        records.append(record)
    return records


def _truncate_after(path: pathlib.Path, step: int) -> list[dict]:
    """Keeps the records of steps <= `step` (each step once: a later line of a step replaces an earlier one);
    rewrites the file (atomically) if anything changes. Returns the kept records."""
    if not path.exists():
        return []
    records = _parse_lines(path)
    by_step = {}
    for record in records:
        if record["step"] <= step:
            by_step[record["step"]] = record
    kept = [by_step[s] for s in sorted(by_step)]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text():
        if len(kept) < len(records):
            logging.info("%s: dropped %d lines after step %d (or repeated)", path, len(records) - len(kept), step)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return kept


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (a partial last line, as a live or killed run leaves, is skipped)."""
    return _parse_lines(pathlib.Path(path))


def plot_losses(metrics_path, png_path, baseline: float | None = None) -> pathlib.Path:
    """Train loss per step and val loss per eval, from metrics.jsonl, as a PNG; `baseline` (e.g. a unigram model's
    val loss) is drawn as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="gray", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path

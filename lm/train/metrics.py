"""Training metrics: <workdir>/metrics.jsonl + TensorBoard (tensorboardX), device peak FLOP/s for MFU, loss plots."""
import functools
import json
import math
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

    On resume from step s, lines for steps after s (written before a kill) are dropped so that the file holds
    exactly one curve.
    """

    def __init__(self, workdir, resume_step: int | None = None, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step or 0)
        self._file = self.path.open("a")
        if tensorboard:
            self._tb = _tensorboard_writer(pathlib.Path(workdir) / "tb")

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


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


def _truncate_after(path: pathlib.Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path, png_path) -> pathlib.Path:
    """Train loss per step and val loss per eval, from metrics.jsonl, as a PNG."""
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

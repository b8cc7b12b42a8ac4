"""GPU training throughput: the gpt2_124m config in bfloat16 on synthetic batches; prints tokens/s and MFU.
With --decode: decode tokens/s of lm.sample.generate_ids (KV cache, greedy) at each of --batches instead.

Uses lm's real train step (sharded state, AdamW, clipping, donated state, compiled once), reading the loss back
every step as the training loop does. Imports no TensorFlow (the GPU image has none): the data pipeline is
replaced by random tokens. MFU = model FLOPs per token (6N + attention) x tokens/s over the device's dense bf16
peak (lm.train.metrics.PEAK_FLOPS; H200: 989 TFLOP/s).

    python benchmarks/gpu_train.py [--steps=300] [--batch_size=32] [--config.model.remat=dots]
    python benchmarks/gpu_train.py --config=configs/tiny.py --config.model.vocab_size=512 --steps=5 \\
        --batch_size=4 --config.train.seq_len=64     # a CPU smoke run
    python benchmarks/gpu_train.py --decode [--batches=1,64 --prompt_len=128 --new_tokens=256 --repeats=3]

Decode tokens/s = batch * new_tokens / median seconds of one whole generate_ids call (prefill included, the
compilation excluded: each batch size runs once untimed first); random prompts, no stop tokens.
benchmarks/device_check.sh runs both on a GPU.
"""
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from lm import config as lm_config  # noqa: E402
from lm import mesh as lm_mesh  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm import sample  # noqa: E402
from lm.train import loop, metrics, pretrain  # noqa: E402

_CONFIG = lm_config.define_config_flag(str(lm_config.REPO / "configs" / "gpt2_124m.py"))
_STEPS = flags.DEFINE_integer("steps", 300, "Timed train steps (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps first.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch in sequences (overrides config.train.batch_size).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay config.model.param_dtype).")
_ATTENTION = flags.DEFINE_string("attention", "dot_product", "xla | dot_product (cuDNN flash attention on GPU).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Print a progress line every this many steps.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the summary as JSON here.")
_DECODE = flags.DEFINE_bool("decode", False, "Measure decoding (lm.sample.generate_ids) instead of training.")
_BATCHES = flags.DEFINE_list("batches", ["1", "64"], "--decode: batch sizes.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "--decode: prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "--decode: tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "--decode: timed calls per batch size (the median is reported).")


def benchmark_config():
    config = _CONFIG.value
    with config.unlocked():
        config.train.batch_size = _BATCH.value
        config.train.steps = _WARMUP.value + _STEPS.value
        config.model.dtype = _DTYPE.value
        config.model.attention = _ATTENTION.value
        config.model.max_len = max(config.model.max_len, config.train.seq_len)
    if not config.model.vocab_size:
        raise ValueError("config.model.vocab_size is 0: give it, e.g. --config.model.vocab_size=50304")
    return lm_config.validate(config)


def synthetic_batches(config, mesh, n=4):
    rng = np.random.default_rng(0)
    shape = (config.train.batch_size // jax.process_count(), config.train.seq_len + 1)
    batches = []
    for _ in range(n):
        rows = rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)
        local = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones(rows[:, 1:].shape, np.float32)}
        batches.append(loop.global_batch(local, mesh))
    return batches


def decode_benchmark(config) -> dict:
    """Greedy decode tokens/s per batch size with random weights and prompts."""
    model = lm_model.Transformer(config.model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    greedy = sample.Sampling(temperature=0.0)
    results = {}
    for batch in map(int, _BATCHES.value):
        prompts = rng.integers(0, config.model.vocab_size, (batch, _PROMPT_LEN.value)).tolist()
        run = lambda: sample.generate_ids(model, prompts, jax.random.key(0), _NEW_TOKENS.value, greedy)  # noqa
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        seconds = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            out = run()
            seconds.append(time.perf_counter() - start)
        assert out.tokens.shape[:2] == (batch, _NEW_TOKENS.value), out.tokens.shape
        median = float(np.median(seconds))
        results[str(batch)] = dict(tokens_per_sec=round(batch * _NEW_TOKENS.value / median, 1),
                                   call_seconds=round(median, 4), first_call_seconds=round(first, 2))
        print(f"decode batch {batch}: {results[str(batch)]['tokens_per_sec']:,.0f} tokens/s "
              f"({median:.3f} s per call of {_NEW_TOKENS.value} tokens after a {_PROMPT_LEN.value}-token prompt)",
              flush=True)
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__, params=lm_model.param_count(config.model),
                dtype=config.model.dtype, param_dtype=config.model.param_dtype, prompt_len=_PROMPT_LEN.value,
                new_tokens=_NEW_TOKENS.value, batches=results, tensorflow_imported="tensorflow" in sys.modules)


def write_summary(summary: dict) -> None:
    logging.info("summary: %s", summary)
    print(json.dumps(summary))
    if _OUTPUT.value:
        pathlib.Path(_OUTPUT.value).write_text(json.dumps(summary, indent=2) + "\n")


def main(argv):
    del argv
    config = benchmark_config()
    if _DECODE.value:
        write_summary(decode_benchmark(config))
        return
    peak = metrics.peak_flops()
    mesh = lm_mesh.make_mesh(config.mesh)
    objective = loop.Objective(loss=pretrain.lm_loss, train_batches=None,
                               make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh):
        batches = synthetic_batches(config, mesh)
        start = time.perf_counter()
        state, compiled = loop.fresh_state_and_step(objective, config.train, mesh, batches[0])
        compile_seconds = time.perf_counter() - start  # includes the (small) parameter init
        compiled_info = loop.log_compiled(compiled, "train step")

        tokens_per_step = config.train.batch_size * config.train.seq_len
        flops_per_token = lm_model.flops_per_token(config.model, config.train.seq_len)
        losses, step_seconds = [], []
        for step in range(_WARMUP.value + _STEPS.value):
            tick = time.perf_counter()
            state, step_metrics = compiled(state, batches[step % len(batches)])
            losses.append(float(step_metrics["loss"]))
            step_seconds.append(time.perf_counter() - tick)
            if (step + 1) % _LOG_EVERY.value == 0:
                rate = tokens_per_step / np.median(step_seconds[-_LOG_EVERY.value:])
                print(f"step {step + 1}: loss {losses[-1]:.3f}, {rate:,.0f} tokens/s, "
                      f"MFU {rate * flops_per_token / peak:.1%}", flush=True)

    timed = step_seconds[_WARMUP.value:]
    rate = tokens_per_step * len(timed) / sum(timed)
    summary = dict(
        device=jax.devices()[0].device_kind, n_devices=jax.device_count(), jax=jax.__version__,
        params=lm_model.param_count(config.model), batch_size=config.train.batch_size, seq_len=config.train.seq_len,
        grad_accum=config.train.grad_accum, dtype=config.model.dtype, attention=config.model.attention,
        remat=config.model.remat, steps=len(timed), tokens_per_sec=round(rate, 1),
        step_ms_median=round(1e3 * float(np.median(timed)), 3), flops_per_token=flops_per_token,
        peak_tflops=round(peak / 1e12, 3), mfu=round(rate * flops_per_token / peak, 4),
        compile_seconds=round(compile_seconds, 1), first_loss=losses[0], last_loss=losses[-1],
        memory=compiled_info, tensorflow_imported="tensorflow" in sys.modules)
    write_summary(summary)


if __name__ == "__main__":
    app.run(main)

"""Decode speed: lm.sample (KV cache, one jitted while_loop) vs the same model without a cache, vs HF transformers
`generate` (PyTorch, use_cache=True) with the same random weights, greedy, batch 1 and 8.

    python benchmarks/bench_sample.py [--config=configs/tiny.py] [--prompt_len=16 --new_tokens=128 --repeats=5]

tokens/s = batch * new_tokens / median seconds of one whole generate call (prefill included, compilation excluded:
each path runs once before it is timed; the paths take turns so load changes on a shared machine hit them alike).
HF runs at each of --torch_threads (1 and 2 by default; lm is compared with HF's faster one). Also checks that the
paths produce the same greedy tokens. --floor (on by default) also times each side's matmuls of one decode step
alone: a decode loop built on them cannot be faster, so a goal below both sides' floors needs fewer bytes per weight
or faster kernels, not a better loop. Writes benchmarks/results/sample.json only from a quiet run (benchmarks/quiet.py):

    ../shared/tools/quiet-run -- python benchmarks/bench_sample.py
    ../shared/tools/quiet-run -- python benchmarks/bench_sample.py --config=configs/gpt2_124m.py --repeats=3 --nono_cache
"""
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import quiet  # noqa: E402
from lm import config as lm_config  # noqa: E402
from lm import sample  # noqa: E402
from lm.model import hf, layers  # noqa: E402
from lm.model import Transformer, param_count  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "sample.json"

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Config whose model shape is benchmarked (gpt2 family).")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "Vocabulary size when the config leaves it to the tokenizer (0).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per path (the median is reported).")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["1", "2"], "torch.set_num_threads values HF runs with (each "
                                   "timed; the faster one is the peer).")
_NO_CACHE = flags.DEFINE_bool("no_cache", True, "Also time greedy decoding without a KV cache (minutes per call at "
                               "gpt2_124m: --nono_cache there).")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Where to write the JSON results.")
_FLOOR = flags.DEFINE_bool("floor", True, "Also time each side's matmuls of one decode step alone (every weight matrix "
                            "once against [batch, in] rows, the LM head included): a floor under any decode loop "
                            "built on that side's matmuls, set beside the step time each side gets and the goal's.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute of both sides (lm: "
                           "model.param_dtype and model.dtype; HF: the model cast with .to()). At batch 1 a decode "
                           "step reads every weight once: bfloat16 halves the bytes.")


def measure(paths: dict, repeats: int) -> dict:
    """{name: (median seconds, last result)} for {name: fn}: one untimed warm-up each, then the paths take turns
    `repeats` times, so a load change on a shared machine hits them alike."""
    results = {name: fn() for name, fn in paths.items()}
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in paths}


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens"))
def _greedy_without_cache(state, tokens, *, graphdef, new_tokens):
    """Greedy decoding by recomputing the whole sequence every step (the baseline a KV cache removes)."""
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    buffer = jnp.zeros((B, P + new_tokens), jnp.int32).at[:, :P].set(tokens)

    def step(i, buffer):
        logits = model(buffer)  # causal: the zeros after position P + i - 1 do not change its logits
        next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False), -1)
        return jax.lax.dynamic_update_index_in_dim(buffer, next_token.astype(jnp.int32), P + i, axis=1)

    return jax.lax.fori_loop(0, new_tokens, step, buffer)[:, P:]


def ours_with_cache(model, prompts, new_tokens):
    out = sample.generate_ids(model, prompts, jax.random.key(0), new_tokens, sample.Sampling(temperature=0))
    return out.tokens


def ours_without_cache(model, prompts, new_tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(_greedy_without_cache(state, jnp.asarray(prompts, jnp.int32), graphdef=graphdef,
                                            new_tokens=new_tokens))


def hf_generate(torch_model, prompts, new_tokens, threads: int):
    import torch
    torch.set_num_threads(threads)
    inputs = torch.tensor(np.asarray(prompts), dtype=torch.long)
    with torch.inference_mode():
        out = torch_model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, inputs.shape[1]:].numpy()


def lm_matmuls(model, batch: int, rng):
    """One decode step's matmuls as lm runs them (lm.model.layers.dense, 2-D as config.model.flat_matmuls; the tied
    head contracting the embedding's model axis, float32 out) -> a function that runs them once and waits."""
    matrices = []
    for path, param in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param)):
        w, name = param[...], path[-1]
        if name in ("q", "k", "v"):
            matrices.append(w.reshape(w.shape[0], -1))
        elif name == "o":
            matrices.append(w.reshape(-1, w.shape[-1]))
        elif name in ("up", "gate", "down"):
            matrices.append(w)
    tied = model.head is None
    head = model.embed[...] if tied else model.head[...]
    dims = {w.shape[0] for w in matrices} | {model.spec.d_model}
    rows = {n: jnp.asarray(rng.standard_normal((batch, n)), model.spec.dtype) for n in dims}

    @jax.jit
    def step(matrices, head, rows):
        logits = jnp.einsum("nd,vd->nv" if tied else "nd,dv->nv", rows[model.spec.d_model], head,
                            preferred_element_type=jnp.float32)  # as Transformer.logits
        return sum(jnp.sum(layers.dense(rows[w.shape[0]], w)) for w in matrices) + jnp.sum(logits)
    return lambda: step(matrices, head, rows).block_until_ready()


def hf_matmuls(torch_model, batch: int, threads: int):
    """The same for HF's GPT2LMHeadModel: its Conv1D weights [in, out] as `x @ w` (Conv1D runs addmm; the bias
    add left out as on lm's side) and the tied lm_head as F.linear, at `threads` torch threads."""
    import torch
    blocks = torch_model.transformer.h
    matrices = [m.weight for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    head = torch_model.lm_head.weight
    dtype = head.dtype
    rows = {n: torch.randn(batch, n, dtype=dtype) for n in {w.shape[0] for w in matrices} | {head.shape[1]}}

    def step():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            total = sum((rows[w.shape[0]] @ w).sum() for w in matrices)
            return float(total + torch.nn.functional.linear(rows[head.shape[1]], head).sum())
    return step


def hf_model(model, model_config):
    import transformers
    torch_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf.config_to_hf(model_config)))
    import torch
    state = {name: torch.from_numpy(t.copy()) for name, t in hf.to_hf_state_dict(model, model_config).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    torch_model.tie_weights()
    return torch_model.eval()


def main(argv):
    del argv
    config = lm_config.load(_CONFIG.value, {"model.dtype": _DTYPE.value, "model.param_dtype": _DTYPE.value})
    if not config.model.vocab_size:
        config.model.vocab_size = _VOCAB.value
    if config.model.family != "gpt2":
        raise app.UsageError("the HF comparison uses GPT2LMHeadModel: pick a gpt2-family config")
    if _PROMPT_LEN.value + _NEW.value > config.model.max_len:
        raise app.UsageError(f"prompt_len + new_tokens > max_len={config.model.max_len}")
    import torch
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    torch_model = hf_model(model, config.model).to(getattr(torch, _DTYPE.value))
    rng = np.random.default_rng(0)
    rows = []
    with quiet.ForeignLoad() as load:
        for batch in map(int, _BATCHES.value):
            rows.append(measure_batch(model, torch_model, rng, batch, config.model.vocab_size))
    run = dict(config=_CONFIG.value, dtype=_DTYPE.value, params=param_count(config.model), results=rows,
               model={k: config.model[k] for k in ("family", "n_layers", "d_model", "n_heads", "d_ff", "vocab_size",
                                                    "max_len")},
               software=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                             backend=jax.default_backend(), torch=torch.__version__),
               **load.fields())
    write(pathlib.Path(_OUTPUT.value), run, load)


def measure_batch(model, torch_model, rng, batch: int, vocab_size: int) -> dict:
    prompts = rng.integers(0, vocab_size, (batch, _PROMPT_LEN.value)).tolist()
    new = _NEW.value
    hf_paths = {f"hf_generate_{t}t": functools.partial(hf_generate, torch_model, prompts, new, int(t))
                for t in _TORCH_THREADS.value}
    no_cache = {"no_cache": lambda: ours_without_cache(model, prompts, new)} if _NO_CACHE.value else {}
    measured = measure({"kv_cache": lambda: ours_with_cache(model, prompts, new), **no_cache, **hf_paths},
                       _REPEATS.value)
    speed = {name: round(batch * new / seconds, 1) for name, (seconds, _) in measured.items()}
    tokens = {name: result for name, (_, result) in measured.items()}
    best_hf = max(hf_paths, key=speed.get)
    row = dict(batch=batch, new_tokens=new, prompt_len=_PROMPT_LEN.value, tokens_per_s=speed, hf_best=best_hf,
               speedup_vs_hf=round(speed["kv_cache"] / speed[best_hf], 2),
               **(dict(speedup_vs_no_cache=round(speed["kv_cache"] / speed["no_cache"], 2),
                       same_tokens_as_no_cache=float(np.mean(tokens["kv_cache"] == tokens["no_cache"])))
                  if no_cache else {}),
               same_tokens_as_hf=float(np.mean(tokens["kv_cache"] == tokens[best_hf])))
    if _FLOOR.value:
        row.update(floor(model, torch_model, rng, batch, measured, best_hf))
    hf_speeds = ", ".join(f"{name} {speed[name]:.0f}" for name in hf_paths)
    vs_no_cache = (f", {row['speedup_vs_no_cache']:.2f}x no cache ({speed['no_cache']:.0f} tok/s, tokens equal "
                   f"{row['same_tokens_as_no_cache']:.0%})" if no_cache else "")
    print(f"batch {batch}: KV cache {speed['kv_cache']:.0f} tok/s, {hf_speeds} tok/s -> {row['speedup_vs_hf']:.2f}x "
          f"HF ({best_hf}){vs_no_cache}; tokens equal HF's: {row['same_tokens_as_hf']:.0%}", flush=True)
    return row


def floor(model, torch_model, rng, batch: int, measured: dict, best_hf: str) -> dict:
    """Each side's decode step (ms per generated token, prefill included) beside its matmuls alone (ms, median
    of 11, interleaved), HF's at the thread count its generate ran fastest with, and the step the 1.5x goal needs."""
    threads = int(best_hf.rsplit("_", 1)[1].rstrip("t"))
    timed = measure({"lm": lm_matmuls(model, batch, rng), "hf": hf_matmuls(torch_model, batch, threads)}, 11)
    step_ms = {name: round(1e3 * measured[name][0] / _NEW.value, 2) for name in ("kv_cache", best_hf)}
    row = dict(step_ms=step_ms, matmuls_ms={name: round(1e3 * t, 2) for name, (t, _) in timed.items()},
               goal_step_ms=round(step_ms[best_hf] / 1.5, 2))
    print(f"batch {batch}: step ms lm {step_ms['kv_cache']}, HF {step_ms[best_hf]} (1.5x needs "
          f"{row['goal_step_ms']}); matmuls alone ms lm {row['matmuls_ms']['lm']}, HF {row['matmuls_ms']['hf']}",
          flush=True)
    return row


def write(path, run, load):
    """Adds this run to the results file, replacing an earlier run of the same config (only from a quiet run)."""
    result = json.loads(path.read_text()) if path.exists() else {}
    same = lambda r: (r["config"], r.get("dtype", "float32")) == (run["config"], run["dtype"])
    runs = [r for r in result.get("runs", []) if not same(r) and r.get("verdict") == "OK"] + [run]
    result = dict(benchmark="greedy decode tokens/s: lm.sample (KV cache) vs no cache vs HF generate (use_cache)",
                  command="python benchmarks/bench_sample.py [--config=...]", runs=runs)
    quiet.write_if_quiet(result, path, load)


if __name__ == "__main__":
    app.run(main)

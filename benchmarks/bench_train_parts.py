"""Where the training step's time goes: lm (JAX) vs the nanoGPT-style PyTorch GPT of bench_train.py, per component.

The shapes, the PyTorch model and lm's config come from benchmarks/bench_train.py. Each component runs forward +
backward (with a fixed random cotangent, the same on both sides) through each side's real code: lm's layers from
lm.model (jitted), PyTorch's modules from bench_train:

  mlp          one block's MLP (lm.model.layers.MLP vs c_fc, GELU, mlp_proj)
  block        one whole block (norms, attention with its projections, MLP)
  attn:<impl>  the attention core on q, k, v: lm.model.layers.attention per implementation (the configured one is
               marked *) vs F.scaled_dot_product_attention(is_causal=True)
  head:<loss>  token + position embedding, final norm, tied head and cross-entropy: lm's default loss path
               (token_logprobs_from_hidden) and the fused one (head_nll_sum, train.fused_loss) vs F.cross_entropy
  optim:<kind> the optimizer update of every parameter: lm's optax chain as the trainer builds it (global-norm clip +
               AdamW, state donated) vs torch clip_grad_norm_ + AdamW (for-loop, foreach, fused)
  step         the whole training step (bench_train's trainers)

Per component: median ms per call, lm's speed over PyTorch's best variant of it, its share of the step (x layers for
the per-block ones) and the matmul FLOP rate it reaches (nominal fwd + bwd matmul FLOPs, causal attention counted
in full as flops_per_token does) as a fraction of the measured float32 matmul peak (bench_train's probe).
lm variants: `lm` as configured plus any bench_train lever (--levers), each in its own worker process, as is torch;
rounds are interleaved (component by component, every worker in turn); the foreign CPU load is recorded
(benchmarks/quiet.py) and --output is written only when the run was quiet.

    ../shared/tools/quiet-run -- python benchmarks/bench_train_parts.py
    python benchmarks/bench_train_parts.py --sizes=small --rounds=1 --output=/tmp/parts.json   # a smoke run
"""
import json
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import bench_train, quiet  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm.model import layers  # noqa: E402
from lm.train import losses, optim  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "train_parts.json"
ATTENTION = ("xla", "dot_product", "blockwise")
TORCH_OPTIMIZERS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}

# bench_train's flags (--sizes, --levers: each an lm worker of its own next to `lm`, --rounds, --torch_threads: a
# torch worker each, --peak_probes, --max_foreign_load, --output), with this benchmark's defaults
for _name, _default in (("levers", []), ("rounds", 3), ("torch_threads", [str(os.cpu_count())]), ("peak_probes", 3),
                        ("output", str(RESULTS))):
    flags.FLAGS.set_default(_name, _default)
_CALL_SECONDS = flags.DEFINE_float("call_seconds", 0.3, "Target seconds of one component's timed calls a round.")


# --- Inputs and FLOPs ----------------------------------------------------------------------------------------------

def inputs(size) -> dict:
    """The same random arrays for both sides (numpy float32 / int)."""
    rng = np.random.default_rng(0)
    B, T, d, H = size["batch_size"], size["seq_len"], size["d_model"], size["n_heads"]
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    batch = bench_train.synthetic_batches(size, 1)[0]
    return dict(x=normal(B, T, d), dx=normal(B, T, d), q=normal(B, T, H, d // H), k=normal(B, T, H, d // H),
                v=normal(B, T, H, d // H), dq=normal(B, T, H, d // H), tokens=batch["inputs"], targets=batch["targets"])


def matmul_flops(size) -> dict:
    """Nominal forward + backward matmul FLOPs of one call of each component kind."""
    N, T, d, f, V = (size["batch_size"] * size["seq_len"], size["seq_len"], size["d_model"], size["d_ff"],
                     size["vocab_size"])
    mlp, attn = 3 * 2 * N * 2 * d * f, 12 * N * d * T
    step = lm_model.flops_per_token(bench_train.make_config(size).model, T) * N
    return dict(mlp=mlp, block=mlp + 3 * 2 * N * 4 * d * d + attn, attn=attn, head=3 * 2 * N * d * V, optim=0,
                step=step)


def per_step(name: str, size) -> int:
    """How many times a step runs this component."""
    return size["n_layers"] if name.split(":")[0] in ("mlp", "block", "attn") else 1


# --- lm ------------------------------------------------------------------------------------------------------------

def vjp_call(fn, primals, cotangent):
    """A no-argument call of jit(fn's forward + backward with `cotangent`) on `primals`, waited for."""
    def forward_backward(primals, cotangent):
        out, pullback = jax.vjp(fn, *primals)
        return pullback(cotangent)
    jitted = jax.jit(forward_backward)
    return lambda: jax.block_until_ready(jitted(primals, cotangent))


def module_call(module, x, dx, *args):
    graphdef, state = nnx.split(module)

    def fn(state, x):
        out = nnx.merge(graphdef, state)(x, *args)
        return out[0] if isinstance(out, tuple) else out
    return vjp_call(fn, (state, x), dx)


def lm_head_call(model, tokens, targets, fused: bool, chunk: int):
    """Embeddings, final norm, tied head and the summed loss, differentiated w.r.t. the parameters outside blocks."""
    graphdef, outside, blocks = nnx.split(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("blocks"))), ...)
    T = tokens.shape[1]

    def loss(outside, tokens, targets):
        m = nnx.merge(graphdef, outside, blocks)
        x = jnp.take(m.embed[...], tokens, axis=0) + m.pos_embed[...][:T]  # as Transformer.hidden
        hidden = m.final_norm(x)
        if fused:
            return lm_model.head_nll_sum(hidden, m.head_weight(), targets, jnp.ones(targets.shape), chunk)
        return -jnp.sum(losses.token_logprobs_from_hidden(m, hidden, targets, chunk))

    jitted = jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(jitted(outside, tokens, targets))


def lm_optimizer_call(model, train_config, flatten: bool = False):
    """One donated optimizer update of every parameter (the trainer's optax chain) with fixed random gradients."""
    tx = optim.make_optimizer(train_config)
    if flatten:  # prototype: one raveled vector (its decay mask is lost, so this is an upper bound)
        tx = optax.flatten(tx)
    params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))  # its own buffers: they are donated
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(next(keys), p.shape), params)
    holder = [params, tx.init(params)]

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    jitted = jax.jit(update, donate_argnums=(0, 1))

    def call():
        holder[:] = jax.block_until_ready(jitted(*holder, grads))
    return call


def lm_calls(size, overrides) -> dict:
    config = bench_train.make_config(size, overrides)
    model = lm_model.Transformer(config.model, rngs=nnx.Rngs(0))
    a = {k: jnp.asarray(v) for k, v in inputs(size).items()}
    block, spec = model.blocks[0], model.spec
    chunk = int(config.train.get("loss_chunk", 0) or 0)
    calls = {"mlp": module_call(block.mlp, a["x"], a["dx"]),
             "block": module_call(block, a["x"], a["dx"], None, None, None)}
    for impl in ATTENTION:
        star = "*" if impl == resolved_attention(spec) else ""
        calls[f"attn:{impl}{star}"] = vjp_call(lambda q, k, v, impl=impl: layers.attention(
            q, k, v, None, impl, block=spec.attention_block), (a["q"], a["k"], a["v"]), a["dq"])
    default_head = "fused" if config.train.get("fused_loss", False) else "plain"
    for name, fused in (("plain", False), ("fused", True)):
        star = "*" if name == default_head else ""
        calls[f"head:{name}{star}"] = lm_head_call(model, a["tokens"], a["targets"], fused, chunk or 128 * fused)
    calls["optim:optax*"] = lm_optimizer_call(model, config.train)
    calls["optim:optax_flat"] = lm_optimizer_call(model, config.train, flatten=True)
    step, _ = bench_train.lm_trainer(config, bench_train.synthetic_batches(size))
    calls["step"] = counter_call(step)
    return calls


def resolved_attention(spec) -> str:
    """The implementation layers.attention runs for the configured one at this length ("auto" resolves)."""
    if spec.attention != "auto":
        return spec.attention
    return "blockwise" if spec.max_len >= layers.AUTO_BLOCKWISE_BLOCKS * spec.attention_block else "xla"


def counter_call(step):
    """A no-argument call of a bench_train step(i) (each call the next batch)."""
    counter = iter(range(10 ** 9))
    return lambda: step(next(counter))


# --- PyTorch -------------------------------------------------------------------------------------------------------

def torch_backward_call(fn, primals, cotangent):
    """A no-argument call of fn(*primals) forward + backward with `cotangent` (grads of leaves reset each call)."""
    def call():
        for p in primals:
            p.grad = None
        out = fn(*primals)
        out.backward(cotangent) if cotangent is not None else out.backward()
    return call


def torch_module_call(fn, module, primals, cotangent):
    """torch_backward_call with `module`'s parameter grads reset too."""
    inner = torch_backward_call(fn, primals, cotangent)

    def call():
        module.zero_grad(set_to_none=True)
        inner()
    return call


def torch_optimizer_call(model, **kind):
    opt = bench_train.torch_adamw(model, **kind)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=generator)

    def call():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=kind.get("foreach", kind.get("fused")))
        opt.step()
    return call


def torch_calls(size) -> dict:
    torch.manual_seed(0)
    model = bench_train.TorchGPT(size["vocab_size"], size["seq_len"], size["d_model"], size["n_layers"],
                                 size["n_heads"], size["d_ff"])
    a = {k: torch.from_numpy(v) for k, v in inputs(size).items()}
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    heads_first = lambda t: leaf(t.transpose(1, 2).contiguous())  # noqa: E731  [B, H, T, D], SDPA's layout
    block = model.blocks[0]
    x = leaf(a["x"])
    tokens, targets = a["tokens"].long(), a["targets"].long()
    calls = {"mlp": torch_module_call(block.mlp, block, (x,), a["dx"]),
             "block": torch_module_call(block, block, (x,), a["dx"]),
             "attn:sdpa*": torch_backward_call(
                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                 (heads_first(a["q"]), heads_first(a["k"]), heads_first(a["v"])), a["dq"].transpose(1, 2)),
             "head:cross_entropy*": torch_module_call(lambda: model.loss(model.embed(tokens), targets), model, (),
                                                      None)}
    for name, kind in TORCH_OPTIMIZERS.items():  # bench_train's trainer uses torch's CPU default, the for-loop
        calls[f"optim:{name}{'*' if name == 'loop' else ''}"] = torch_optimizer_call(model, **kind)
    step, _ = bench_train.torch_trainer(size, bench_train.synthetic_batches(size))
    calls["step"] = counter_call(step)
    return calls


# --- Workers and rounds --------------------------------------------------------------------------------------------

def worker(variant: dict, size: dict, connection):
    """Builds a side's calls, warms each up; reports {call: warm seconds}; then answers (call, n) with seconds/call."""
    if variant["side"] == "torch":
        torch.set_num_threads(variant["threads"])
        calls = torch_calls(size)
    else:
        if variant["xla_flags"]:  # read when the backend starts (nothing has run in jax yet)
            os.environ["XLA_FLAGS"] = bench_train.with_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                                                 variant["xla_flags"])
        calls = lm_calls(size, variant["overrides"])
    warm = {}
    for name, call in calls.items():
        call()  # compiles
        start = time.perf_counter()
        call()
        warm[name] = time.perf_counter() - start
    connection.send((warm, bench_train.proc_kb_field("/proc/self/status", "VmHWM")))
    while (request := connection.recv()) is not None:
        name, n = request
        start = time.perf_counter()
        for _ in range(n):
            calls[name]()
        connection.send((time.perf_counter() - start) / n)


def start_workers(size, variants):
    """All workers spawned at once (start-up is not timed) -> ({name: (process, pipe)}, {name: (warm, peak rss)})."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name, variant in variants.items():
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(variant, size, child), daemon=True)
        process.start()
        child.close()  # so that a worker that dies makes recv raise instead of hanging
        workers[name] = (process, parent)
    return workers, {name: connection.recv() for name, (_, connection) in workers.items()}


def timed_rounds(workers, warm, rounds) -> dict:
    """Interleaved rounds: per component, every worker that has it in turn -> {worker: {call: [seconds]}}."""
    times = {w: {c: [] for c in warm[w]} for w in workers}
    components = list(dict.fromkeys(c for w in workers for c in warm[w]))
    for _ in range(rounds):
        for component in components:
            having = [w for w in workers if component in warm[w]]
            n = max(1, round(_CALL_SECONDS.value / max(warm[w][component] for w in having)))
            for w in having:
                workers[w][1].send((component, n))
                times[w][component].append(workers[w][1].recv())
    return times


def variants(levers) -> dict:
    """torch_<t>t per thread count, lm, lm+<lever> per lever (bench_train's variants)."""
    return bench_train.variants(bench_train._TORCH_THREADS.value, levers)


def summarize(size, times, peak) -> dict:
    """Per worker and component: ms, share of that worker's step, fraction of peak; lm's speed over torch's best."""
    flops = matmul_flops(size)
    out = {}
    for w, components in times.items():
        step_s = float(np.median(components["step"]))
        out[w] = {}
        for c, ts in components.items():
            s = float(np.median(ts))
            out[w][c] = dict(ms=round(1e3 * s, 3), ms_all=[round(1e3 * t, 3) for t in ts], per_step=per_step(c, size),
                             share_of_step=round(per_step(c, size) * s / step_s, 3),
                             fraction_of_peak=round(flops[c.split(":")[0]] / s / peak, 4))
    torch_rows = [(c, r) for w in out if w.startswith("torch") for c, r in out[w].items()]
    for kind in dict.fromkeys(c.split(":")[0] for c, _ in torch_rows):
        best = min(r["ms"] for c, r in torch_rows if c.split(":")[0] == kind)
        for w in out:
            for c, r in out[w].items():
                if c.split(":")[0] == kind:
                    r["speed_vs_torch_best"] = round(best / r["ms"], 3)
    return out


def print_table(name, size, result):
    print(f"\n{name}: batch {size['batch_size']} x {size['seq_len']}, d {size['d_model']}, {size['n_layers']} "
          f"layers, vocab {size['vocab_size']}, foreign load {result['foreign_load_cores']} cores")
    print(f"  {'worker':18s} {'component':20s} {'x':>3s} {'ms':>9s} {'vs torch':>9s} {'of step':>8s} {'peak':>6s}")
    for w, components in result["components"].items():
        for c, r in components.items():
            print(f"  {w:18s} {c:20s} {r['per_step']:3d} {r['ms']:9.2f} {r['speed_vs_torch_best']:8.2f}x "
                  f"{r['share_of_step']:8.1%} {r['fraction_of_peak']:6.1%}")
    for w, components in result["components"].items():  # what the parts above do not cover
        covered = sum(r["share_of_step"] for c, r in components.items()
                      if c == "block" or (c.endswith("*") and c.split(":")[0] in ("head", "optim")))
        print(f"  {w:18s} blocks + default head + default optimizer = {covered:.0%} of its step")
    sys.stdout.flush()


def run_size(name, size, peak, levers) -> dict:
    workers, started = start_workers(size, variants(levers))
    warm = {w: s[0] for w, s in started.items()}
    pids = [process.pid for process, _ in workers.values()]
    with quiet.ForeignLoad(pids=pids, max_load=bench_train._MAX_FOREIGN.value) as load:
        times = timed_rounds(workers, warm, bench_train._ROUNDS.value)
    for process, connection in workers.values():
        connection.send(None)
        process.join()
    result = dict(size, foreign_load_cores=load.cores, timed_seconds=round(load.wall, 1),
                  peak_rss_mb={w: round(s[1] / 2 ** 20) for w, s in started.items()},
                  components=summarize(size, times, peak))
    print_table(name, size, result)
    return result


def main(argv):
    del argv
    sizes, levers = bench_train._SIZES.value, [] if bench_train._LEVERS.value == ["none"] else bench_train._LEVERS.value
    unknown = [lever for lever in levers if lever not in bench_train.LEVERS]
    if unknown or any(s not in bench_train.SIZES for s in sizes):
        sys.exit(f"unknown lever(s) {unknown} or size(s) in {sizes}")
    probes = [bench_train.peak_probe() for _ in range(max(1, bench_train._PROBES.value))]
    peak = float(np.median(probes))
    results = {}
    # the whole run (compiles included); each shape's timed rounds are in results[...]["foreign_load_cores"]
    with quiet.ForeignLoad(max_load=bench_train._MAX_FOREIGN.value) as total:
        for name in sizes:
            results[name] = run_size(name, bench_train.SIZES[name], peak, levers)
    total.cores = max([total.cores] + [r["foreign_load_cores"] for r in results.values()])
    report = dict(benchmark="training step by component, lm (JAX) vs PyTorch nanoGPT-style GPT, fp32 CPU",
                  command="python benchmarks/bench_train_parts.py " + " ".join(sys.argv[1:]),
                  versions=dict(jax=jax.__version__, torch=torch.__version__, cpus=os.cpu_count()),
                  matmul_peak_gflops=round(peak / 1e9, 1),
                  matmul_peak_probes_gflops=[round(p / 1e9, 1) for p in probes],
                  torch_threads=bench_train._TORCH_THREADS.value,
                  levers={lever: bench_train.LEVERS[lever] for lever in levers}, sizes=results)
    print(f"\nmatmul peak {report['matmul_peak_gflops']} GFLOP/s; worst foreign load {total.cores} cores")
    quiet.write_if_quiet(report, bench_train._OUTPUT.value, total)


if __name__ == "__main__":
    app.run(main)

"""Training step time of lm vs a nanoGPT-style PyTorch GPT (fp32, CPU), and of each of lm's compute levers.

Same shapes (GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied embeddings; parameter counts checked
equal), same synthetic batches, AdamW with global-norm clipping on both sides (torch's fused AdamW, its fastest
here), the loss read back every step on both sides (as the training loop does). PyTorch uses
F.scaled_dot_product_attention(is_causal=True) and runs with 1 and with all threads (both reported; lm is compared with the faster). lm runs once as configured (`base`) and once per
lever in --levers, each lever alone on top of `base` (and `all`: every model lever together), so one run gives the
per-lever table. Every variant lives in its own worker process (thread pools never compete; an XLA flag applies to
one worker only), and rounds are interleaved (torch, lm, lm+lever, ..., then again) so machine noise hits all alike;
each variant's median step time is reported.

The run records the foreign CPU load during the timed rounds (busy CPU time from /proc/stat minus the CPU time of
this process and its workers, over the wall time) and the float32 matmul peak (median of quiet probes between
shapes). Above --max_foreign_load cores the figures are marked contended and --output is not written (exit code 3):
on 2 shared cores a contended run flatters whichever side suffers less. Run it alone, ideally under
../shared/tools/quiet-run:

    ../shared/tools/quiet-run -- python benchmarks/bench_train.py                 # all shapes and levers
    python benchmarks/bench_train.py --sizes=small --levers=fused_qkv --rounds=1 --round_seconds=0 \\
        --output=/tmp/t.json                                                      # a smoke run (~1 minute)

Steps per round are chosen per shape so that one round of one variant takes about --round_seconds (at least 1).
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
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.quiet import busy_cpu_seconds, machine, own_cpu_seconds  # noqa: E402
from lm import config as lm_config  # noqa: E402
from lm import mesh as lm_mesh  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm.train import loop, losses, metrics  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "train.json"
SIZES = {  # the four shapes: the tiny presets, then nanoGPT-like ones
    "small": dict(n_layers=2, d_model=128, n_heads=4, d_ff=512, vocab_size=2048, seq_len=128, batch_size=8),
    "medium": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, vocab_size=4096, seq_len=256, batch_size=8),
    "nano_4x256": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, vocab_size=8192, seq_len=256, batch_size=16),
    "nano_6x384": dict(n_layers=6, d_model=384, n_heads=6, d_ff=1536, vocab_size=32768, seq_len=512, batch_size=8),
}
# lever -> (config overrides on top of the base config, XLA_FLAGS for that worker). Model levers are exact (see
# tests/test_attention.py); XLA flags change only how XLA compiles and runs the same program.
LEVERS = {
    "no_flat_matmuls": ({"model.flat_matmuls": False}, ""),  # flat 2-D matmuls are the default
    "fused_qkv": ({"model.fused_qkv": True}, ""),
    "blockwise": ({"model.attention": "blockwise", "model.attention_block": 128}, ""),
    "blockwise64": ({"model.attention": "blockwise", "model.attention_block": 64}, ""),
    "dot_product": ({"model.attention": "dot_product"}, ""),
    "xla_attention": ({"model.attention": "xla"}, ""),  # the default is "auto": blockwise from 512 positions
    "loss_chunk": ({"train.loss_chunk": 128}, ""),
    "fused_loss": ({"train.fused_loss": True}, ""),  # 128 positions a chunk
    "fused_loss32": ({"train.fused_loss": True, "train.loss_chunk": 32}, ""),
    "xnnpack": ({}, "--xla_cpu_use_xnnpack=true"),
    "onednn": ({}, "--xla_cpu_use_onednn=true"),
    "concurrency_scheduler": ({}, "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    "single_thread_eigen": ({}, "--xla_cpu_multi_thread_eigen=false"),
    "legacy_runtime": ({}, "--xla_cpu_use_thunk_runtime=false"),
    # jaxlib 0.10.2 routes dots (and some reductions) through YNNPACK "__ynn_fusion"s; these narrow or disable that
    # (the train step compiles with it off on CPU: lm.train.loop.train_step_compiler_options, so `base` is ynn_off;
    # LM_XLA_DEFAULTS=1 turns it off for a whole lm process). A fusion type in XLA_FLAGS wins over the train step's
    # option, and a flag without "=" only removes a setting of it: ynn_on is jaxlib's own default.
    "ynn_off": ({}, "--xla_cpu_experimental_ynn_fusion_type="),
    "ynn_on": ({}, "--xla_cpu_experimental_ynn_fusion_type"),
    "ynn_dots_only": ({}, "--xla_cpu_experimental_ynn_fusion_type=individual_dot"),
    "fast_math": ({}, "--xla_cpu_enable_fast_math=true"),
    # data parallelism over 2 host "devices" (the batch sharded, gradients all-reduced in process): for the small
    # shapes, whose ops are too small to keep two threads busy
    "dp2": ({"mesh.data": 2}, "--xla_force_host_platform_device_count=2"),
    "dp2_single_thread": ({"mesh.data": 2}, "--xla_force_host_platform_device_count=2 "
                          "--xla_cpu_multi_thread_eigen=false"),
    # every lever that won somewhere together (attention stays "auto": blockwise lost at 256 positions)
    "all": ({"model.fused_qkv": True, "train.fused_loss": True, "train.loss_chunk": 32},
            "--xla_cpu_experimental_ynn_fusion_type="),
}
DEFAULT_LEVERS = ["ynn_on", "ynn_dots_only", "xla_attention", "fused_loss", "fused_loss32", "dp2", "all"]

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (each times every variant once).")
_ROUND_SECONDS = flags.DEFINE_float("round_seconds", 2.0, "Target seconds of one variant's round (sets the steps).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per round and variant (0: from --round_seconds).")
_SIZES = flags.DEFINE_list("sizes", list(SIZES), f"Shapes to run: {', '.join(SIZES)}.")
_LEVERS = flags.DEFINE_list("levers", DEFAULT_LEVERS, f"lm levers, each measured alone: {', '.join(LEVERS)}; "
                            "'none' for the base config only.")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["1", str(os.cpu_count())], "PyTorch thread counts to run.")
_MAX_FOREIGN = flags.DEFINE_float("max_foreign_load", 0.1, "Foreign busy cores above which the run is contended.")
_PROBES = flags.DEFINE_integer("peak_probes", 5, "Matmul peak probes, at least one after each shape (the median "
                              "is reported).")
_MAX_WORKERS = flags.DEFINE_integer("max_workers", 0, "Worker processes alive at once (0: as many as fit in memory; "
                                   "levers beyond that are measured in further groups, each with torch and lm).")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Results JSON (written only when the run is not contended).")


def make_config(size: dict, overrides: dict | None = None):
    model = {f"model.{k}": v for k, v in size.items() if k not in ("seq_len", "batch_size")}
    return lm_config.load("configs/tiny.py", {
        **model, "model.n_kv_heads": size["n_heads"], "model.max_len": size["seq_len"], "model.dtype": "float32",
        "train.seq_len": size["seq_len"], "train.batch_size": size["batch_size"], "train.warmup_steps": 0,
        "train.lr": 1e-3, "train.steps": 10_000, "mesh.data": 1, **(overrides or {})})


# --- PyTorch GPT (nanoGPT) -----------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, d, heads, d_ff):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.c_attn, self.c_proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.c_fc, self.mlp_proj = torch.nn.Linear(d, d_ff), torch.nn.Linear(d_ff, d)

    def forward(self, x):
        x = x + self.attend(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def attend(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def mlp(self, x):
        return self.mlp_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class TorchGPT(torch.nn.Module):
    def __init__(self, vocab, seq_len, d, layers, heads, d_ff):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(seq_len, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads, d_ff) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.loss(x, targets)

    def embed(self, idx):
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))

    def loss(self, x, targets):
        """Final norm, tied head and mean cross-entropy of the last block's output x [B, T, d]."""
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_adamw(model, **kind):
    """nanoGPT's AdamW (decay on the weight matrices, not on embeddings, norms or biases); kind: foreach / fused."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.wte.weight and p is not model.wpe.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **kind)


def torch_trainer(size, batches):
    model = TorchGPT(size["vocab_size"], size["seq_len"], size["d_model"], size["n_layers"], size["n_heads"],
                     size["d_ff"])
    # fused: torch's fastest AdamW on this CPU (bench_train_parts: the default for-loop one is 1.7-2.6x slower),
    # so the peer runs at its best setting
    opt = torch_adamw(model, fused=True)
    data = [(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()) for b in batches]
    n_params = sum(p.numel() for p in model.parameters())

    def step(i):
        inputs, targets = data[i % len(data)]
        loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return step, n_params


# --- lm ------------------------------------------------------------------------------------------------------------

def lm_trainer(config, batches):
    mesh = lm_mesh.make_mesh(config.mesh)
    objective = loop.Objective(loss=losses.make_lm_loss(config.train), train_batches=None,
                               make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh):
        data = [loop.global_batch(b, mesh) for b in batches]
        state, compiled = loop.fresh_state_and_step(objective, config.train, mesh, data[0])
    holder = {"state": state}

    def step(i):
        holder["state"], step_metrics = compiled(holder["state"], data[i % len(data)])
        return float(step_metrics["loss"])

    return step, lm_model.param_count(config.model)


# --- Workers -------------------------------------------------------------------------------------------------------

def synthetic_batches(size, n=4):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, size["vocab_size"], (n, size["batch_size"], size["seq_len"] + 1), dtype=np.int32)
    return [{"inputs": r[:, :-1], "targets": r[:, 1:], "loss_mask": np.ones(r[:, 1:].shape, np.float32)}
            for r in rows]


def with_xla_flags(flags: str, lever_flags: str) -> str:
    """XLA_FLAGS `flags` with each of `lever_flags` replacing any setting of the same flag (lm's defaults included);
    a lever flag without "=" only removes it."""
    names = {f.split("=", 1)[0] for f in lever_flags.split()}
    kept = [f for f in flags.split() if f.split("=", 1)[0] not in names]
    return " ".join(kept + [f for f in lever_flags.split() if "=" in f])


def worker(variant: dict, size: dict, connection):
    """Builds one variant's trainer; reports (params, first loss, a warm step's seconds, CPU seconds); then, per request
    (first step, n), times n steps and answers (seconds per step, last loss, this process's CPU seconds so far)."""
    if variant["side"] == "torch":
        torch.set_num_threads(variant["threads"])
        step, n_params = torch_trainer(size, synthetic_batches(size))
    else:
        if variant["xla_flags"]:  # read when the backend starts, which is after this (nothing ran in jax yet)
            os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""), variant["xla_flags"])
        step, n_params = lm_trainer(make_config(size, variant["overrides"]), synthetic_batches(size))
    first_loss = step(0)  # compiles and warms up
    start = time.perf_counter()
    step(1)
    connection.send((n_params, first_loss, time.perf_counter() - start, own_cpu_seconds()))
    while (request := connection.recv()) is not None:
        first, n = request
        start = time.perf_counter()
        for i in range(first, first + n):
            loss = step(i)
        connection.send(((time.perf_counter() - start) / n, loss, own_cpu_seconds()))


def variants(torch_threads, levers) -> dict:
    out = {f"torch_{t}t": dict(side="torch", threads=int(t)) for t in torch_threads}
    out["lm"] = dict(side="lm", overrides={}, xla_flags="")
    for lever in levers:
        overrides, xla_flags = LEVERS[lever]
        out[f"lm+{lever}"] = dict(side="lm", overrides=overrides, xla_flags=xla_flags)
    return out


# --- The comparison ------------------------------------------------------------------------------------------------

def start_workers(size, all_variants):
    """One spawned worker per variant, started one after another; -> ({name: (process, pipe)}, {name: its report})."""
    context = multiprocessing.get_context("spawn")
    workers, started = {}, {}
    for name, variant in all_variants.items():
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(variant, size, child), daemon=True)
        process.start()
        child.close()  # a worker that dies then makes recv raise instead of hanging
        workers[name] = (process, parent)
        started[name] = parent.recv()
    return workers, started


def stop_workers(workers):
    for process, connection in workers.values():
        connection.send(None)
        process.join()


def proc_kb_field(path: str, field: str) -> int:
    """A "<field>: <n> kB" line of a /proc file, in bytes (0 when absent)."""
    for line in open(path):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def lever_groups(levers, anchors, max_workers: int) -> list[list[str]]:
    """The lever variants split so that anchors + one group fit in memory: at nano_6x384 ten workers of ~3.7 GB
    each do not fit in 24 GB. max_workers 0: as many as fit in 70% of the memory now available, judged by the
    largest anchor worker's resident size."""
    if not max_workers:
        largest = max(proc_kb_field(f"/proc/{process.pid}/status", "VmRSS") for process, _ in anchors.values())
        max_workers = len(anchors) + int(0.7 * proc_kb_field("/proc/meminfo", "MemAvailable") / max(largest, 1))
    per_group = max(1, max_workers - len(anchors))
    return [levers[i:i + per_group] for i in range(0, len(levers), per_group)] or [[]]


def timed_rounds(workers, started, rounds, steps):
    """Interleaved rounds -> ({variant: [seconds per step]}, {variant: last loss}, foreign busy cores, seconds)."""
    times = {name: [] for name in workers}
    last_loss = {}
    cpu = {name: s[3] for name, s in started.items()}  # each worker's CPU seconds before the timed part
    cpu_before = sum(cpu.values()) + own_cpu_seconds()
    busy_before, wall_before = busy_cpu_seconds(), time.perf_counter()
    for r in range(rounds):
        for name, (_, connection) in workers.items():
            connection.send((2 + r * steps, steps))
            seconds, last_loss[name], cpu[name] = connection.recv()
            times[name].append(seconds)
    wall = time.perf_counter() - wall_before
    own = sum(cpu.values()) + own_cpu_seconds() - cpu_before
    return times, last_loss, max(0.0, busy_cpu_seconds() - busy_before - own) / wall, wall


def run_size(name, size, peak, rounds, levers):
    """torch (each thread count) and lm's base run in every group of levers (the anchors: each group's ratios are
    measured against them in the same interleaved rounds); each variant's median over all its rounds."""
    all_variants = variants(_TORCH_THREADS.value, levers)
    anchor_names = [v for v in all_variants if not v.startswith("lm+")]
    anchors, started = start_workers(size, {v: all_variants[v] for v in anchor_names})
    groups = lever_groups([f"lm+{lever}" for lever in levers], anchors, _MAX_WORKERS.value)
    times, last_loss, foreign, wall = {}, {}, 0.0, 0.0
    for group in groups:
        extra, extra_started = start_workers(size, {v: all_variants[v] for v in group})
        started.update(extra_started)
        workers = {**anchors, **extra}
        warm = max(started[v][2] for v in workers)
        steps = _STEPS.value or max(1, round(_ROUND_SECONDS.value / warm))
        print(f"{name}: {len(workers)} variants ready ({len(groups)} group(s)), slowest warm step {warm:.2f} s: "
              f"{rounds} rounds of {steps} steps take about "
              f"{rounds * steps * sum(started[v][2] for v in workers):.0f} s", flush=True)
        group_times, group_loss, group_foreign, group_wall = timed_rounds(workers, started, rounds, steps)
        stop_workers(extra)
        for variant, ts in group_times.items():
            times.setdefault(variant, []).extend(ts)
        last_loss.update(group_loss)
        foreign, wall = max(foreign, group_foreign), wall + group_wall
    stop_workers(anchors)
    params = {variant: s[0] for variant, s in started.items()}
    assert len(set(params.values())) == 1, params
    tokens = size["batch_size"] * size["seq_len"]
    flops_per_token = lm_model.flops_per_token(make_config(size).model, size["seq_len"])
    result = dict(size, params=params["lm"], flops_per_token=flops_per_token, steps_per_round=steps,
                  lever_groups=len(groups), foreign_load_cores=round(foreign, 3), timed_seconds=round(wall, 1),
                  variants={})
    for variant, ts in times.items():
        step_s = float(np.median(ts))
        rate = tokens / step_s
        result["variants"][variant] = dict(
            step_ms=round(1e3 * step_s, 2), step_ms_all=[round(1e3 * t, 2) for t in ts],
            tokens_per_sec=round(rate, 1), fraction_of_peak=round(rate * flops_per_token / peak, 4),
            first_loss=started[variant][1], last_loss=last_loss[variant],
            **({k: v for k, v in all_variants[variant].items() if k != "side"}))
    torch_names = [v for v in times if v.startswith("torch")]
    best_torch = min(torch_names, key=lambda v: result["variants"][v]["step_ms"])
    result["torch_best"] = best_torch
    for variant, r in result["variants"].items():
        r["speedup_over_torch"] = round(result["variants"][best_torch]["step_ms"] / r["step_ms"], 3)
        if variant.startswith("lm"):
            r["speedup_over_lm"] = round(result["variants"]["lm"]["step_ms"] / r["step_ms"], 3)
    print_table(name, result)
    return result


def print_table(name, result):
    print(f"\n{name}: {result['params']:,} params, batch {result['batch_size']} x {result['seq_len']}, "
          f"{result['steps_per_round']} steps/round, foreign load {result['foreign_load_cores']} cores", flush=True)
    print(f"  {'variant':28s} {'step ms':>10s} {'vs torch':>9s} {'vs lm':>7s} {'peak':>6s}  last loss")
    for variant, r in result["variants"].items():
        vs_lm = f"{r['speedup_over_lm']:.2f}x" if "speedup_over_lm" in r else ""
        print(f"  {variant:28s} {r['step_ms']:10.1f} {r['speedup_over_torch']:8.2f}x {vs_lm:>7s} "
              f"{r['fraction_of_peak']:6.1%}  {r['last_loss']:.5f}", flush=True)


def peak_probe() -> float:
    """One fresh float32 matmul peak measurement (lm.train.metrics' probe without its cache)."""
    return metrics.measured_matmul_flops.__wrapped__(2048, 3)


def make_report(results, probes, levers, complete: bool) -> dict:
    peak = float(np.median(probes))
    # The worst shape decides. /proc/stat counts clock ticks: a timed part under ~2 s cannot say it was quiet.
    foreign = max(r["foreign_load_cores"] for r in results.values())
    too_short = sum(r["timed_seconds"] for r in results.values()) < 2
    contended = too_short or foreign > _MAX_FOREIGN.value
    return dict(
        benchmark="training step, lm (JAX) and its levers vs PyTorch nanoGPT-style GPT, fp32 CPU, interleaved",
        command="python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        quiet_run=os.environ.get("QUIET_RUN") == "1", foreign_load_cores=foreign,
        verdict="TOO-SHORT" if too_short else ("CONTENDED" if contended else "OK"),
        complete=complete, max_foreign_load=_MAX_FOREIGN.value,
        machine=machine(),
        versions=dict(jax=jax.__version__, torch=torch.__version__),
        torch_optimizer="torch.optim.AdamW(fused=True)",
        matmul_peak_gflops=round(peak / 1e9, 1), matmul_peak_probes_gflops=[round(p / 1e9, 1) for p in probes],
        levers={lever: dict(overrides=LEVERS[lever][0], xla_flags=LEVERS[lever][1]) for lever in levers},
        sizes=results)


def main(argv):
    del argv
    levers = [] if _LEVERS.value == ["none"] else _LEVERS.value
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown or any(s not in SIZES for s in _SIZES.value):
        sys.exit(f"unknown lever(s) {unknown} or size(s) in {_SIZES.value}; levers: {list(LEVERS)}, "
                 f"sizes: {list(SIZES)}")
    probes = [peak_probe() for _ in range(max(1, _PROBES.value - len(_SIZES.value)))]  # the rest between shapes
    results, output = {}, pathlib.Path(_OUTPUT.value)
    for i, name in enumerate(_SIZES.value):
        results[name] = run_size(name, SIZES[name], float(np.median(probes)), _ROUNDS.value, levers)
        probes.append(peak_probe())
        report = make_report(results, probes, levers, complete=i == len(_SIZES.value) - 1)
        if report["verdict"] == "OK":  # written after every shape, so a crash later keeps the shapes done
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmatmul peak (median of {len(probes)} probes): {report['matmul_peak_gflops']} GFLOP/s on "
          f"{os.cpu_count()} cores; foreign load {report['foreign_load_cores']} cores: {report['verdict']}")
    if report["verdict"] != "OK":
        print(json.dumps(report))
        print(f"{report['verdict']}: foreign load {report['foreign_load_cores']} cores (limit {_MAX_FOREIGN.value}): "
              f"{output} not written; these figures are not a result", file=sys.stderr)
        sys.exit(3)
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)

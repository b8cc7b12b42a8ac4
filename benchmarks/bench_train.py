"""Training throughput of lm's train step vs a straightforward PyTorch GPT-2 (nanoGPT style), fp32 on CPU.

Same shapes (GPT-2 family: learned positions, LayerNorm, GELU MLP, biases, tied embeddings; the parameter
counts are checked equal), same synthetic batches, AdamW with global-norm clipping on both sides, the loss
read back every step on both sides (as the training loop does). Each side lives in its own worker process
(so XLA's and torch's thread pools never compete), and rounds are interleaved (lm, torch, lm, torch, ...) so
machine noise hits both alike; the median step time of each side is reported. Achieved FLOP/s use
the model FLOPs per token (6N + attention) and are compared with a measured float32 matmul peak.

    python benchmarks/bench_train.py [--rounds=5] [--steps=10]
"""
import json
import multiprocessing
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from lm import config as lm_config  # noqa: E402
from lm import mesh as lm_mesh  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm.train import loop, metrics, pretrain  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "train.json"
SIZES = {
    "small": dict(n_layers=2, d_model=128, n_heads=4, d_ff=512, vocab_size=2048, seq_len=128, batch_size=8),
    "medium": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, vocab_size=4096, seq_len=256, batch_size=8),
}

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (each times `steps` steps of lm, then of torch).")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps per round and side.")
_SIZES = flags.DEFINE_list("sizes", list(SIZES), "Sizes to run.")


def make_config(size: dict):
    model = {f"model.{k}": v for k, v in size.items() if k not in ("seq_len", "batch_size")}
    return lm_config.load("configs/tiny.py", {
        **model, "model.n_kv_heads": size["n_heads"], "model.max_len": size["seq_len"], "model.dtype": "float32",
        "train.seq_len": size["seq_len"], "train.batch_size": size["batch_size"], "train.warmup_steps": 0,
        "train.lr": 1e-3, "train.steps": 10_000, "mesh.data": 1})


# --- PyTorch GPT (nanoGPT) -----------------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, d, heads, d_ff):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.c_attn, self.c_proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.c_fc, self.mlp_proj = torch.nn.Linear(d, d_ff), torch.nn.Linear(d_ff, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


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
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_trainer(size, batches):
    model = TorchGPT(size["vocab_size"], size["seq_len"], size["d_model"], size["n_layers"], size["n_heads"],
                     size["d_ff"])
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.wte.weight and p is not model.wpe.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
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
    objective = loop.Objective(loss=pretrain.lm_loss, train_batches=None,
                               make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh):
        data = [loop.global_batch(b, mesh) for b in batches]
        state, compiled = loop.fresh_state_and_step(objective, config.train, mesh, data[0])
    holder = {"state": state}

    def step(i):
        holder["state"], step_metrics = compiled(holder["state"], data[i % len(data)])
        return float(step_metrics["loss"])

    return step, lm_model.param_count(config.model)


# --- the comparison ------------------------------------------------------------------------------------------------

def synthetic_batches(size, n=8):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, size["vocab_size"], (n, size["batch_size"], size["seq_len"] + 1), dtype=np.int32)
    return [{"inputs": r[:, :-1], "targets": r[:, 1:], "loss_mask": np.ones(r[:, 1:].shape, np.float32)}
            for r in rows]


def worker(side: str, size: dict, connection):
    """Builds one side's trainer, reports (params, first loss), then times `n` steps from `first` per request."""
    if side == "torch":
        torch.set_num_threads(os.cpu_count())
        step, n_params = torch_trainer(size, synthetic_batches(size))
    else:
        step, n_params = lm_trainer(make_config(size), synthetic_batches(size))
    connection.send((n_params, step(0)))  # the first step also warms up
    while (request := connection.recv()) is not None:
        first, n = request
        start = time.perf_counter()
        for i in range(first, first + n):
            step(i)
        connection.send((time.perf_counter() - start) / n)


def run_size(name, size, peak, rounds, steps):
    context = multiprocessing.get_context("spawn")
    workers = {}
    for side in ("lm", "torch"):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(side, size, child), daemon=True)
        process.start()
        workers[side] = (process, parent)
    started = {side: connection.recv() for side, (_, connection) in workers.items()}
    lm_params, torch_params = started["lm"][0], started["torch"][0]
    assert lm_params == torch_params, (lm_params, torch_params)
    times = {"lm": [], "torch": []}
    for r in range(rounds):
        for side, (_, connection) in workers.items():
            connection.send((1 + r * steps, steps))
            times[side].append(connection.recv())
    for process, connection in workers.values():
        connection.send(None)
        process.join()
    config = make_config(size)
    tokens = size["batch_size"] * size["seq_len"]
    flops_per_token = lm_model.flops_per_token(config.model, size["seq_len"])
    result = dict(size, params=lm_params, flops_per_token=flops_per_token,
                  first_loss={side: loss for side, (_, loss) in started.items()})
    for side, ts in times.items():
        rate = tokens / float(np.median(ts))
        result[side] = dict(tokens_per_sec=round(rate, 1), step_ms=round(1e3 * float(np.median(ts)), 2),
                            step_ms_all=[round(1e3 * t, 2) for t in ts], gflops=round(rate * flops_per_token / 1e9, 2),
                            fraction_of_peak=round(rate * flops_per_token / peak, 4))
    result["speedup_lm_over_torch"] = round(result["lm"]["tokens_per_sec"] / result["torch"]["tokens_per_sec"], 3)
    print(f"{name}: {lm_params:,} params, batch {size['batch_size']} x {size['seq_len']}: "
          f"lm {result['lm']['tokens_per_sec']:,.0f} tok/s ({result['lm']['fraction_of_peak']:.1%} of peak), "
          f"torch {result['torch']['tokens_per_sec']:,.0f} tok/s ({result['torch']['fraction_of_peak']:.1%}); "
          f"lm / torch = {result['speedup_lm_over_torch']:.2f}x", flush=True)
    return result


def main(argv):
    del argv
    peak = metrics.measured_matmul_flops()
    print(f"measured float32 matmul peak (jax, 2048^3): {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} cores")
    results = {name: run_size(name, SIZES[name], peak, _ROUNDS.value, _STEPS.value) for name in _SIZES.value}
    report = dict(benchmark="training tokens/s, lm (JAX) vs PyTorch nanoGPT-style GPT, fp32 CPU, interleaved",
                  command="python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
                  machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine()),
                  versions=dict(jax=jax.__version__, torch=torch.__version__), matmul_peak_gflops=round(peak / 1e9, 1),
                  sizes=results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    app.run(main)

"""SFT throughput vs pretraining throughput on the same model: tokens/s of the SFT step (supervised tokens, i.e.
assistant tokens, and all token positions, padding included) and of the pretraining step, each with its own batch
source inside the timed loop (SFT: the synthetic task mix as conversation shards, one conversation per row through
the tf.data pipeline's `document` packing, as lm.train.sft reads them; pretraining: the same pipeline over token
shards). Each side runs in its own worker process and rounds are
interleaved (sft, pretrain, sft, ...) so machine noise hits both alike; medians are reported.

Both steps are the same compiled program for the same shapes (SFT differs only in its batches), so all-token rates
should match and the supervised rate is the all-token rate times the supervised fraction of a row: the figure that
says how much of SFT's compute padding and prompts take.

    ../shared/tools/quiet-run -- python benchmarks/bench_sft.py [--rounds=5] [--steps=10] [--sizes=tiny]

The foreign CPU load over each shape's timed rounds is recorded (benchmarks/quiet.py); results/sft.json is written
only when every shape was quiet (else the figures are printed as CONTENDED and the exit code is 3).
"""
import json
import multiprocessing
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import quiet  # noqa: E402
from lm import config as lm_config  # noqa: E402
from lm import mesh as lm_mesh  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm.data import pipeline, tokenize  # noqa: E402
from lm.train import loop, losses, pretrain, sft  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "sft.json"
SIZES = {   # model overrides of configs/sft_tiny.py (its model is configs/tiny.py's) and the batch
    "tiny": dict(batch_size=16, seq_len=96),
    "small": dict(batch_size=16, seq_len=128, **{"model.n_layers": 4, "model.d_model": 256, "model.n_heads": 4,
                                                  "model.n_kv_heads": 4, "model.d_ff": 1024}),
}

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (each times `steps` steps of SFT, then pretraining).")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps per round and side.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 20, "Untimed steps per side first (compilation, and tf.data's buffers: "
                               "with one, a pretraining round ran at half speed while its pipeline filled).")
_SIZES = flags.DEFINE_list("sizes", ["tiny"], f"Sizes to run: {', '.join(SIZES)}.")
_VOCAB = flags.DEFINE_integer("vocab", 2048, "Vocabulary of the BPE trained on CPython's docs for the run.")


def make_config(size: dict, vocab: int):
    overrides = {k: v for k, v in size.items() if k.startswith("model.")}
    config = lm_config.load("configs/sft_tiny.py", {
        **overrides, "train.seq_len": size["seq_len"], "train.batch_size": size["batch_size"],
        "train.steps": 10_000, "train.warmup_steps": 0, "mesh.data": 1})
    return pretrain.resolve_vocab(config, vocab)


def prepare(directory: pathlib.Path, vocab: int) -> None:
    """directory/tokenizer (a BPE trained on CPython's docs) and directory/tokens (the docs, tokenized)."""
    from pydoc_data.topics import topics

    from lm.tokenizer import train as tokenizer_train
    texts = [text for _, text in sorted(topics.items())]
    (directory / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = tokenizer_train.train(texts, vocab, directory / "tokenizer")
    tokenize.run(tokenizer, [str(directory / "docs.jsonl")], directory / "tokens", dict(val_fraction=0.0))


def write_conversations(directory: pathlib.Path, seq_len: int) -> None:
    """directory/sft_<seq_len>/: the training conversations of configs/sft_tiny.py's task mix as shards."""
    from lm import tokenizer as lm_tokenizer
    tokenizer = lm_tokenizer.load(directory / "tokenizer")
    config = lm_config.load("configs/sft_tiny.py", {"train.seq_len": seq_len})
    splits, _ = sft.build_data(config, sft.make_tasks(config.sft))
    tokenize.write_conversations(tokenizer, {"train": splits["train"]}, directory / f"sft_{seq_len}", seq_len)


def trainer(config, batch_source):
    """step(i) -> (loss, supervised tokens, all tokens): makes batch i, then one update (loss read back)."""
    mesh = lm_mesh.make_mesh(config.mesh)
    objective = loop.Objective(loss=losses.lm_loss, train_batches=None,
                               make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(0)))
    first = batch_source(0)
    with jax.set_mesh(mesh):
        state, compiled = loop.fresh_state_and_step(objective, config.train, mesh, loop.global_batch(first, mesh))
    holder = {"state": state}

    def step(i):
        local = batch_source(i)
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], loop.global_batch(local, mesh))
        return float(metrics["loss"]), float(local["loss_mask"].sum()), int(local["loss_mask"].size)

    return step


def worker(side: str, size: dict, vocab: int, directory: str, connection, warmup: int):
    config = make_config(size, vocab)
    train = config.train
    if side == "sft":
        batches = pipeline.train_batches(pathlib.Path(directory) / f"sft_{train.seq_len}", train.seq_len,
                                         train.batch_size, config.seed, process_index=0, process_count=1,
                                         packing="document")
        step = trainer(config, lambda i: next(batches))
    else:
        batches = pipeline.train_batches(pathlib.Path(directory) / "tokens", train.seq_len, train.batch_size,
                                         config.seed, process_index=0, process_count=1)
        step = trainer(config, lambda i: next(batches))
    first_step = step(0)  # compiles
    for i in range(1, warmup):
        step(i)
    connection.send(first_step)
    while (request := connection.recv()) is not None:
        first, n = request
        supervised = processed = 0
        start = time.perf_counter()
        for i in range(first, first + n):
            _, s, a = step(i)
            supervised, processed = supervised + s, processed + a
        seconds = time.perf_counter() - start
        connection.send((supervised / seconds, processed / seconds))


def run_size(name, size, vocab, directory, rounds, steps, warmup):
    context = multiprocessing.get_context("spawn")
    workers = {}
    for side in ("sft", "pretrain"):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(side, size, vocab, str(directory), child, warmup), daemon=True)
        process.start()
        workers[side] = (process, parent)
    first = {side: connection.recv() for side, (_, connection) in workers.items()}
    rates = {side: [] for side in workers}
    with quiet.ForeignLoad(pids=[process.pid for process, _ in workers.values()]) as load:
        for r in range(rounds):
            for side, (_, connection) in workers.items():
                connection.send((warmup + r * steps, steps))
                rates[side].append(connection.recv())
    for process, connection in workers.values():
        connection.send(None)
        process.join()
    config = make_config(size, vocab)
    result = dict(size, params=lm_model.param_count(config.model), vocab=vocab,
                  first_loss={side: values[0] for side, values in first.items()}, **load.fields())
    for side, values in rates.items():
        supervised, processed = (float(np.median([v[i] for v in values])) for i in (0, 1))
        result[side] = dict(supervised_tokens_per_sec=round(supervised, 1), all_tokens_per_sec=round(processed, 1),
                            supervised_fraction=round(supervised / processed, 4),
                            rounds=[[round(s, 1), round(a, 1)] for s, a in values])
    result["sft_over_pretrain_all_tokens"] = round(result["sft"]["all_tokens_per_sec"]
                                                   / result["pretrain"]["all_tokens_per_sec"], 3)
    result["sft_supervised_over_pretrain"] = round(result["sft"]["supervised_tokens_per_sec"]
                                                   / result["pretrain"]["supervised_tokens_per_sec"], 3)
    print(f"{name}: {result['params']:,} params, batch {size['batch_size']} x {size['seq_len']}: "
          f"SFT {result['sft']['supervised_tokens_per_sec']:,.0f} supervised tok/s of "
          f"{result['sft']['all_tokens_per_sec']:,.0f} tok/s ({result['sft']['supervised_fraction']:.1%}); "
          f"pretraining {result['pretrain']['all_tokens_per_sec']:,.0f} tok/s; SFT / pretraining (all tokens) = "
          f"{result['sft_over_pretrain_all_tokens']:.2f}x; foreign load {load.cores} cores", flush=True)
    return result, load


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        prepare(directory, _VOCAB.value)
        results, loads = {}, {}
        for name in _SIZES.value:
            size = SIZES[name]
            if not (directory / f"sft_{size['seq_len']}").exists():
                write_conversations(directory, size["seq_len"])
            results[name], loads[name] = run_size(name, size, _VOCAB.value, directory, _ROUNDS.value, _STEPS.value,
                                                  max(_WARMUP.value, 1))
    report = dict(benchmark="SFT (supervised and all tokens/s) vs pretraining tokens/s, same model, interleaved",
                  command="python benchmarks/bench_sft.py " + " ".join(sys.argv[1:]),
                  machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine()),
                  jax=jax.__version__, results=results)
    worst = max(loads.values(), key=lambda load: (load.verdict != "OK", load.cores))   # the worst shape decides
    quiet.write_if_quiet(report, RESULTS, worst)


if __name__ == "__main__":
    app.run(main)

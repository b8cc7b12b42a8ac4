"""Does the input pipeline keep up with training? And how fast is tokenization?

1. Tokenization of the FineWeb sample (../shared/data) with cl100k_base: lm.data.tokenize.run (all cores, reading
   jsonl.gz, splitting, writing shards) against the peer, raw tiktoken on the same texts already in memory
   (encode_ordinary_batch on all cores, and single-threaded).
2. Pipeline tokens/s at seq_len 1024, global batch 32 (tf.data, concat and document packing; and the bare numpy batch
   function) against the consumption rate of a jitted forward + backward of lm.model.Transformer at the tiny and
   gpt2_124m configs on this machine's CPU (same run). Also the tiny step fed by the pipeline vs on a fixed batch.

    python benchmarks/bench_pipeline.py [--quick]     # writes benchmarks/results/bench_pipeline.json
"""
import argparse
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import quiet  # noqa: E402
SHARED = pathlib.Path(os.environ.get("LM_SHARED_DATA", REPO.parent / "shared" / "data"))
FINEWEB = SHARED / "web/text/fineweb_sample10BT_2400docs.jsonl.gz"
CL100K = SHARED / "tokenizers/cl100k_base.tiktoken"
SEQ_LEN, GLOBAL_BATCH = 1024, 32


def bench_tokenization(tok, tokens_dir) -> dict:
    from lm.data import tokenize
    with gzip.open(FINEWEB, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    n_bytes = sum(len(t.encode()) for t in texts)
    cores = tokenize.available_cores()
    start = time.perf_counter()
    index = tokenize.run(tok, [str(FINEWEB)], tokens_dir, dict(val_fraction=0.05))
    ours = time.perf_counter() - start
    enc = tok._enc   # the peer: tiktoken itself, on texts already decoded in memory
    start = time.perf_counter()
    enc.encode_ordinary_batch(texts, num_threads=cores)
    peer_all = time.perf_counter() - start
    start = time.perf_counter()
    for text in texts:
        enc.encode_ordinary(text)
    peer_one = time.perf_counter() - start
    result = dict(documents=len(texts), mb=round(n_bytes / 1e6, 2), cores=cores,
                  tokens=index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"],
                  ours_mb_per_s=round(n_bytes / 1e6 / ours, 2),
                  tiktoken_batch_mb_per_s=round(n_bytes / 1e6 / peer_all, 2),
                  tiktoken_1thread_mb_per_s=round(n_bytes / 1e6 / peer_one, 2))
    result["ours_over_tiktoken_batch"] = round(peer_all / ours, 3)
    return result


def bench_pipeline(tokens_dir, steps: int) -> dict:
    from lm.data import pipeline
    out = {}
    windows = pipeline.Windows(pipeline.TokenData(tokens_dir, "train"), SEQ_LEN)
    start = time.perf_counter()
    for step in range(steps):
        pipeline.train_batch(windows, step, GLOBAL_BATCH, 0)
    out["numpy_batch_fn_tokens_per_s"] = round(steps * GLOBAL_BATCH * SEQ_LEN / (time.perf_counter() - start))
    for packing in ("concat", "document"):
        batches = pipeline.train_batches(tokens_dir, SEQ_LEN, GLOBAL_BATCH, seed=0, process_index=0,
                                         process_count=1, packing=packing)
        next(batches)   # TensorFlow import and pipeline start-up
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
        out[f"tfdata_{packing}_tokens_per_s"] = round(steps * GLOBAL_BATCH * SEQ_LEN / (time.perf_counter() - start))
    return out


def train_step_fn(model_config):
    """A jitted forward + backward (mean next-token cross-entropy and its gradient) of lm.model.Transformer."""
    import jax
    import optax
    from flax import nnx
    from lm.model import Transformer
    model = Transformer(model_config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, inputs, targets):
        logits = nnx.merge(graphdef, params, rest)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return jax.jit(jax.value_and_grad(loss)), params


def bench_consumption(name: str, batch: int, seq_len: int, steps: int) -> dict:
    import jax
    from lm import config as lm_config
    from lm import mesh as lm_mesh
    config = lm_config.load(str(REPO / "configs" / f"{name}.py"))
    model_config = config.model
    with model_config.unlocked():
        model_config.vocab_size = model_config.vocab_size or config.tokenizer.vocab_size
        model_config.max_len = max(model_config.max_len, seq_len)   # the tiny shape at seq_len 1024 too
    mesh = lm_mesh.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        step, params = train_step_fn(model_config)
        tokens = np.random.default_rng(0).integers(0, model_config.vocab_size, (batch, seq_len + 1), dtype=np.int32)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        start = time.perf_counter()
        jax.block_until_ready(step(params, inputs, targets))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(step(params, inputs, targets))
        seconds = (time.perf_counter() - start) / steps
    return dict(config=name, batch=batch, seq_len=seq_len, vocab_size=model_config.vocab_size,
                compile_s=round(compile_s, 1), step_s=round(seconds, 4), tokens_per_s=round(batch * seq_len / seconds))


def bench_fed_vs_fixed(tokens_dir, steps: int) -> dict:
    """The tiny config's step fed by train_batches vs on one fixed batch: the pipeline's cost inside training."""
    import jax
    from lm import config as lm_config
    from lm import mesh as lm_mesh
    from lm.data import pipeline
    config = lm_config.load(str(REPO / "configs" / "tiny.py"))
    vocab = config.tokenizer.vocab_size   # ids are folded into tiny's vocabulary: only the timing matters here
    with config.model.unlocked():
        config.model.vocab_size = vocab
    seq_len, batch = config.train.seq_len, config.train.batch_size
    mesh = lm_mesh.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        step, params = train_step_fn(config.model)
        batches = pipeline.train_batches(tokens_dir, seq_len, batch, 0, process_index=0, process_count=1)
        first = next(batches)
        jax.block_until_ready(step(params, first["inputs"] % vocab, first["targets"] % vocab))
        timings = {}
        for mode in ("fixed", "fed"):
            start = time.perf_counter()
            for _ in range(steps):
                b = next(batches) if mode == "fed" else first
                jax.block_until_ready(step(params, b["inputs"] % vocab, b["targets"] % vocab))
            timings[mode] = (time.perf_counter() - start) / steps
    return dict(config="tiny", batch=batch, seq_len=seq_len, vocab_size=config.model.vocab_size,
                fixed_step_s=round(timings["fixed"], 4), fed_step_s=round(timings["fed"], 4),
                fed_over_fixed=round(timings["fed"] / timings["fixed"], 3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    from lm import tokenizer as lm_tokenizer
    tok = lm_tokenizer.load(CL100K)
    results = {"machine": f"{os.cpu_count()} CPU cores", "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH}
    with quiet.ForeignLoad() as load:
        measure(args, tok, results)
    pipeline_rate = results["pipeline"]["tfdata_concat_tokens_per_s"]
    print(f"\npipeline (tf.data, concat, seq_len {SEQ_LEN}, batch {GLOBAL_BATCH}): {pipeline_rate:,} tokens/s")
    for row in results["consumption"]:
        print(f"  vs {row['config']} fwd+bwd (batch {row['batch']} x {row['seq_len']}): {row['tokens_per_s']:,} "
              f"tokens/s -> pipeline is {row['pipeline_over_consumption']}x the consumption")
    t = results["tokenization"]
    print(f"tokenization: {t['ours_mb_per_s']} MB/s (lm.data.tokenize) vs {t['tiktoken_batch_mb_per_s']} MB/s raw "
          f"tiktoken batch ({t['ours_over_tiktoken_batch']}x), {t['tiktoken_1thread_mb_per_s']} MB/s one thread")
    quiet.write_if_quiet(results, REPO / "benchmarks" / "results" / "bench_pipeline.json", load)


def measure(args, tok, results) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokens_dir = pathlib.Path(tmp) / "tokens"
        results["tokenization"] = bench_tokenization(tok, tokens_dir)
        print("tokenization:", results["tokenization"], flush=True)
        results["pipeline"] = bench_pipeline(tokens_dir, 50 if args.quick else 300)
        print("pipeline:", results["pipeline"], flush=True)
        results["tiny_fed_vs_fixed"] = bench_fed_vs_fixed(tokens_dir, 10 if args.quick else 40)
        print("tiny step fed by the pipeline:", results["tiny_fed_vs_fixed"], flush=True)
    consumers = [("tiny", 16, 128, 10 if args.quick else 30), ("tiny", 4, SEQ_LEN, 3 if args.quick else 10),
                 ("gpt2_124m", 1, SEQ_LEN, 2 if args.quick else 3)]
    results["consumption"] = []
    pipeline_rate = results["pipeline"]["tfdata_concat_tokens_per_s"]
    for name, batch, seq_len, steps in consumers:
        row = bench_consumption(name, batch, seq_len, steps)
        row["pipeline_over_consumption"] = round(pipeline_rate / row["tokens_per_s"], 1)
        results["consumption"].append(row)
        print("consumption:", row, flush=True)


if __name__ == "__main__":
    main()

"""Chat latency at batch 1: time to first token (TTFT) and tokens/s of lm.sample.stream (what lm.chat uses: a prefill
call, then one jitted step per token driven from Python) against lm.sample.generate_ids (the whole decode in one
while_loop program, nothing seen before it returns), same random weights, greedy: the cost of streaming.

    ../shared/tools/quiet-run -- python benchmarks/bench_chat.py                 # the result (alone on the machine)
    python benchmarks/bench_chat.py --configs=configs/tiny.py --new_tokens=32 --repeats=1 --output=/tmp/chat.json
                                                                                 # a smoke run
TTFT = seconds from the call until the first token is in the caller's hands (generate_ids: the whole call).
tokens/s = new_tokens / seconds of the whole call. No stop tokens, so every row generates new_tokens. Compilation is
excluded (each path runs once untimed); the paths take turns so a load change on a shared machine hits them alike.
Also checks that both give the same tokens. The foreign CPU load over the timed runs is recorded
(benchmarks/quiet.py); above 0.1 foreign cores (or under 2 s timed) the run is CONTENDED (TOO-SHORT):
printed with that verdict, --output (benchmarks/results/chat.json) not written, exit code 3.
"""
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import quiet  # noqa: E402
from lm import config as lm_config  # noqa: E402
from lm import sample  # noqa: E402
from lm.model import Transformer, param_count  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "chat.json"
GREEDY = sample.Sampling(temperature=0)

_CONFIGS = flags.DEFINE_list("configs", ["configs/tiny.py", "configs/gpt2_124m.py"], "Model shapes benchmarked.")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "Vocabulary size when a config leaves it to the tokenizer (0).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per path (the median is reported).")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Results JSON (written only when the run is not contended).")


def streamed(model, prompt, new_tokens):
    """(seconds to the first token, seconds in all, tokens) of one lm.sample.stream."""
    start = time.perf_counter()
    tokens, first = [], None
    for step in sample.stream(model, [prompt], jax.random.key(0), new_tokens, GREEDY):
        if first is None:
            first = time.perf_counter() - start
        tokens.append(int(step.tokens[0]))
    return first, time.perf_counter() - start, tokens


def whole(model, prompt, new_tokens):
    """The same for one generate_ids call: its first token arrives with the last."""
    start = time.perf_counter()
    out = sample.generate_ids(model, [prompt], jax.random.key(0), new_tokens, GREEDY)
    seconds = time.perf_counter() - start
    return seconds, seconds, out.tokens[0].tolist()


def measure(paths: dict, repeats: int) -> dict:
    """{name: (median TTFT, median total, tokens)}: one untimed warm-up each, then the paths take turns."""
    runs = {name: [] for name in paths}
    for name, fn in paths.items():
        fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            runs[name].append(fn())
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[-1][2])
            for name, rs in runs.items()}


def bench_config(path: str) -> dict:
    config = lm_config.load(path, {"model.dtype": "float32"})
    if not config.model.vocab_size:
        config.model.vocab_size = _VOCAB.value
    if _PROMPT_LEN.value + _NEW.value > config.model.max_len:
        raise app.UsageError(f"{path}: prompt_len + new_tokens > max_len={config.model.max_len}")
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, config.model.vocab_size, _PROMPT_LEN.value).tolist()
    new = _NEW.value
    measured = measure({"stream": lambda: streamed(model, prompt, new),
                        "generate_ids": lambda: whole(model, prompt, new)}, _REPEATS.value)
    row = dict(config=path, params=param_count(config.model), prompt_len=_PROMPT_LEN.value, new_tokens=new,
               ttft_s={name: round(m[0], 4) for name, m in measured.items()},
               tokens_per_s={name: round(new / m[1], 1) for name, m in measured.items()},
               same_tokens=measured["stream"][2] == measured["generate_ids"][2])
    row["stream_vs_generate_ids_throughput"] = round(row["tokens_per_s"]["stream"]
                                                     / row["tokens_per_s"]["generate_ids"], 3)
    print(f"{path}: stream TTFT {row['ttft_s']['stream'] * 1e3:.1f} ms, {row['tokens_per_s']['stream']:.0f} tok/s; "
          f"generate_ids TTFT {row['ttft_s']['generate_ids'] * 1e3:.1f} ms, "
          f"{row['tokens_per_s']['generate_ids']:.0f} tok/s; stream/generate_ids throughput "
          f"{row['stream_vs_generate_ids_throughput']:.2f}; same tokens: {row['same_tokens']}")
    if not row["same_tokens"]:
        raise AssertionError(f"{path}: stream and generate_ids disagree on the greedy tokens")
    return row


def main(argv):
    del argv
    with quiet.ForeignLoad() as load:
        rows = [bench_config(path) for path in _CONFIGS.value]
    quiet.write_if_quiet(dict(
        benchmark="chat latency at batch 1: lm.sample.stream vs generate_ids",
        command="python benchmarks/bench_chat.py " + " ".join(sys.argv[1:]), results=rows, repeats=_REPEATS.value,
        software=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                      backend=jax.default_backend(), devices=str(jax.devices()[0]))), _OUTPUT.value, load)


if __name__ == "__main__":
    app.run(main)

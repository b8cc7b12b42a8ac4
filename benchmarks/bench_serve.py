"""lm.serve under concurrent clients: generated tokens/s and time to first token (TTFT) at 1, 4 and 16 clients, against
the same requests served one at a time by HF transformers `generate` and by a plain loop over
lm.sample.generate_ids; same model shape (random weights, GPT-2 family), same prompts, greedy.

    ../shared/tools/quiet-run -- python benchmarks/bench_serve.py              # the result (alone on the machine)
    python benchmarks/bench_serve.py --clients=1,4 --new_tokens=16 --rounds=1 --output=/tmp/serve.json   # smoke

The server is a real `python -m lm.serve` subprocess on a free loopback port (continuous batching: a request joins
the running decode at the next step); each client is a thread streaming /v1/chat/completions over HTTP
(stream_options.include_usage, so the tokens counted are the server's usage). A round sends one request per client
at once; tokens/s = completion tokens of the round / its wall time; TTFT = from the round's start to a request's
first streamed token (the one-at-a-time peers: to the end of its call, since they return every token at once and
the requests wait their turn). Compilation is excluded: the server warms up every batch size (--warmup_tokens) and
untimed rounds run first. Medians over rounds.

The foreign CPU load over the timed rounds is recorded (benchmarks/quiet.py: busy CPU less this process's and
the server's). Above 0.1 foreign cores the run is CONTENDED (or TOO-SHORT under 2 s): the figures are
printed with that verdict, --output is not written and the exit code is 3.
"""
import concurrent.futures
import json
import os
import pathlib
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import quiet  # noqa: E402
from lm import checkpoint, sample  # noqa: E402
from lm import config as lm_config  # noqa: E402
from lm.model import Transformer, hf, param_count  # noqa: E402
from lm.tokenizer import chat as template  # noqa: E402
from lm.tokenizer import train as tokenizer_train  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "serve.json"

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Model shape served.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary of the BPE trained for it (CPython docs).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent clients per measurement.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "max_tokens of every request.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per client count (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup_rounds", 3, "Untimed rounds first (compiles the shapes the rounds use).")
_TORCH_THREADS = flags.DEFINE_list("torch_threads", ["1", "2"],
                                   "torch thread counts tried for HF generate; the faster is the peer.")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Results JSON (written only when the run is not contended).")


def make_workdir(directory: pathlib.Path):
    """A workdir with a tokenizer and a random-weight sft/ run of the config's shape: (tokenizer, config)."""
    from pydoc_data.topics import topics
    tok = tokenizer_train.train(list(topics.values()), _VOCAB.value)
    config = lm_config.load(_CONFIG.value, {"model.vocab_size": tok.n_vocab, "model.dtype": "float32"})
    tok.save(directory / "tokenizer")
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    checkpoints = checkpoint.Checkpoints(checkpoint.checkpoint_dir(directory / "sft"))
    checkpoints.save(1, {"params": nnx.split(model, nnx.Param, ...)[1]},
                     {"config": config.to_dict(), "tokenizer_hash": tok.hash})
    checkpoints.close()
    return tok, config


def start_server(workdir, max_batch, new_tokens, log):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "lm.serve", f"--workdir={workdir}", "--port=0",
                                f"--max_batch={max_batch}", f"--max_n={max_batch}",
                                f"--warmup_tokens={new_tokens}"],
                               stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    deadline = time.monotonic() + 300
    while not select.select([process.stdout], [], [], 0.5)[0]:
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("lm.serve did not start; see its log")
    return process, process.stdout.readline().strip()


def messages_for(client: int):
    # short enough for the shortest prompt bucket (16 tokens), the one --warmup_tokens compiles
    return [{"role": "user", "content": f"number {client}"}]


def one_request(url, client, new_tokens, start):
    """(seconds from `start` to the first token, completion tokens) of one streamed chat completion."""
    import httpx
    body = dict(model="sft", messages=messages_for(client), temperature=0, max_tokens=new_tokens, stream=True,
                stream_options={"include_usage": True})
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and (chunk["choices"][0]["delta"].get("content")
                                                         or chunk["choices"][0]["finish_reason"]):
                first = time.perf_counter() - start
    return first, tokens


def server_round(url, clients, new_tokens):
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda c: one_request(url, c, new_tokens, start), range(clients)))
    seconds = time.perf_counter() - start
    return seconds, [r[0] for r in results], sum(r[1] for r in results)


def loop_round(model, tok, clients, new_tokens):
    """The same requests served one at a time by generate_ids (the peer: no batching, no streaming)."""
    stops = [tok.token_id(template.ASSISTANT_END), tok.eot_id]
    start = time.perf_counter()
    firsts, tokens = [], 0
    for client in range(clients):
        out = sample.generate_ids(model, [template.render_for_completion(tok, messages_for(client))],
                                  jax.random.key(0), new_tokens, sample.Sampling(temperature=0), stop_ids=stops,
                                  vocab_size=tok.n_vocab)
        firsts.append(time.perf_counter() - start)
        tokens += int(out.lengths[0])
    return time.perf_counter() - start, firsts, tokens


def hf_peer(model, config, directory):
    """The same weights as an HF transformers model (exported by lm.model.hf, read by from_pretrained)."""
    import torch
    import transformers
    hf.export_hf(model, config.model, directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def hf_round(torch_model, tok, clients, new_tokens):
    """The same requests served one at a time by HF generate (greedy, KV cache, stops at the chat's end ids)."""
    import torch
    stops = [tok.token_id(template.ASSISTANT_END), tok.eot_id]
    start = time.perf_counter()
    firsts, tokens = [], 0
    for client in range(clients):
        ids = torch.tensor([template.render_for_completion(tok, messages_for(client))])
        with torch.inference_mode():
            out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       do_sample=False, eos_token_id=stops, pad_token_id=tok.eot_id)
        firsts.append(time.perf_counter() - start)
        tokens += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, firsts, tokens


def measure(run_round, clients, rounds):
    for _ in range(_WARMUP.value):  # compiles the shapes the rounds use (requests may join at other steps)
        run_round(clients)
    timed = [run_round(clients) for _ in range(rounds)]
    return dict(tokens_per_s=statistics.median(t / s for s, _, t in timed),
                ttft_median_s=statistics.median(statistics.median(f) for _, f, _ in timed),
                ttft_max_s=statistics.median(max(f) for _, f, _ in timed),
                tokens_per_round=statistics.median(t for _, _, t in timed))


def main(argv):
    del argv
    clients = [int(c) for c in _CLIENTS.value]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        workdir = pathlib.Path(directory)
        tok, config = make_workdir(workdir)
        model = checkpoint.load_run(workdir / "sft")[0]
        torch_model = hf_peer(model, config, workdir / "hf")
        with open(workdir / "serve.log", "w") as log:
            process, url = start_server(workdir, max(clients), _NEW.value, log)
            try:
                with quiet.ForeignLoad(pids=[process.pid]) as load:
                    for n in clients:
                        rows.append(measure_clients(n, url, model, torch_model, tok))
            finally:
                process.kill()
                process.wait(timeout=30)
    quiet.write_if_quiet(dict(
        benchmark="lm.serve (continuous batching) vs one request at a time (HF generate, generate_ids loop)",
        command="python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]), results=rows, config=_CONFIG.value,
        params=param_count(config.model), vocab_size=tok.n_vocab, new_tokens=_NEW.value, rounds=_ROUNDS.value,
        software=dict(platform=platform.platform(), devices=str(jax.devices()), cpus=os.cpu_count())),
        _OUTPUT.value, load)


def measure_clients(n, url, model, torch_model, tok) -> dict:
    import torch
    new = _NEW.value
    served = measure(lambda c: server_round(url, c, new), n, _ROUNDS.value)
    hf_by_threads = {}
    for threads in map(int, _TORCH_THREADS.value):
        torch.set_num_threads(threads)
        hf_by_threads[threads] = measure(lambda c: hf_round(torch_model, tok, c, new), n, _ROUNDS.value)
    best_threads = max(hf_by_threads, key=lambda t: hf_by_threads[t]["tokens_per_s"])
    peers = dict(hf_generate_loop=dict(hf_by_threads[best_threads], torch_threads=best_threads),
                 generate_ids_loop=measure(lambda c: loop_round(model, tok, c, new), n, _ROUNDS.value))
    row = dict(clients=n, serve=served, **peers,
               hf_tokens_per_s_by_threads={t: r["tokens_per_s"] for t, r in hf_by_threads.items()})
    for name, peer in peers.items():
        row[f"throughput_vs_{name}"] = round(served["tokens_per_s"] / peer["tokens_per_s"], 3)
        row[f"ttft_vs_{name}"] = round(served["ttft_median_s"] / peer["ttft_median_s"], 3)
    print(f"{n:3d} clients: serve {served['tokens_per_s']:8.1f} tok/s, TTFT median {served['ttft_median_s'] * 1e3:7.1f}"
          " ms | " + " | ".join(f"{name} {peer['tokens_per_s']:8.1f} tok/s, TTFT {peer['ttft_median_s'] * 1e3:7.1f} ms"
                                for name, peer in peers.items()), flush=True)
    return row


if __name__ == "__main__":
    app.run(main)

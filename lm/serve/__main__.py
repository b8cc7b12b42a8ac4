"""`python -m lm.serve --workdir=W`: the chat page and the OpenAI-compatible API on one local port.

    python -m lm.serve --workdir=runs/x                      # http://127.0.0.1:8000: chat page; /v1: the API
    python -m lm.serve --workdir=runs/x --port=0             # a free port; the URL is printed on stdout when ready
        [--host=127.0.0.1 --step=N --max_batch=16 --batch_window_ms=10 --max_n=8 --max_tokens=512 --warmup_tokens=0 --preload]

Models: every stage run of W with checkpoints (base = W itself, W/sft, W/ppo, W/grpo), named by stage; a request's
`model` picks one (default: the most trained, as lm.chat picks). The default is loaded at start, the others on their
first request (--preload: all at start), and a loaded model stays loaded: memory is the sum of the loaded models'
parameters (float32: 4 bytes per parameter) plus, while requests decode, the running decode's KV cache (2 x layers x
rows x columns x kv_heads x head_dim x 4 bytes; rows a power of two up to --max_batch, columns a power of two up to
the context, as the requests need) and the compiled programs.
Only 127.0.0.1 is bound unless --host says otherwise (the API has no authentication).
"""
import socket
import sys
import threading
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "A workdir holding stage runs (base in checkpoints/, sft/, ppo/, grpo/) or "
                        "one run directory.", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default: loopback only; the API has no auth).")
    flags.DEFINE_integer("port", 8000, "Port; 0 picks a free one. The URL is printed on stdout when ready.")
    flags.DEFINE_integer("step", None, "Checkpoint step of every model (default: each run's latest).")
    flags.DEFINE_integer("max_batch", 16, "Rows decoded together at most (requests x n).")
    flags.DEFINE_float("batch_window_ms", 10, "How long an idle engine waits for more requests before a decode starts "
                       "(later requests join the running decode at its next step).")
    flags.DEFINE_integer("max_n", 8, "Choices per request at most (n).")
    flags.DEFINE_integer("max_tokens", 512, "Tokens per answer when a request sets no max_tokens (at most what "
                         "the context leaves).")
    flags.DEFINE_integer("warmup_tokens", 0, "If > 0: at start, compile the default model's decode for every batch "
                         "size with this many tokens (else the first batches of each size wait for a compile).")
    flags.DEFINE_bool("preload", False, "Load every model at start (default: the default one; others on first use).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn

    from lm.serve import app as serve_app
    from lm.serve import engine as serve_engine

    if FLAGS.max_n > FLAGS.max_batch:
        raise app.UsageError(f"--max_n={FLAGS.max_n} > --max_batch={FLAGS.max_batch}: a request must fit in a batch")
    models = serve_engine.Models(FLAGS.workdir, step=FLAGS.step)
    for name in models.names if FLAGS.preload else [models.default]:
        models.get(name)
    logging.info("models %s (default %s)", models.paths, models.default)
    engine = serve_engine.Engine(models, max_batch=FLAGS.max_batch, window_s=FLAGS.batch_window_ms / 1000)
    if FLAGS.warmup_tokens > 0:
        started = time.monotonic()
        engine.warm_up(models.default, FLAGS.warmup_tokens)
        logging.info("warmed up %s in %.1fs", models.default, time.monotonic() - started)
    settings = serve_app.Settings(max_n=FLAGS.max_n, default_max_tokens=FLAGS.max_tokens)
    application = serve_app.create_app(models, engine, settings)

    family = socket.AF_INET6 if ":" in FLAGS.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((FLAGS.host, FLAGS.port))
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning", timeout_graceful_shutdown=5))
    threading.Thread(target=announce, args=(server, url), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


def announce(server, url: str) -> None:
    """Print the URL on stdout once the server accepts connections (what scripts and tests wait for)."""
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        print(url, flush=True)
        print(f"lm.serve: chat page {url}/, OpenAI API {url}/v1", file=sys.stderr, flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)

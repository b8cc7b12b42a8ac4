"""Shared test setup: 8 virtual CPU devices, offline hubs, and access to ../shared/data."""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # a caller's own count wins
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import gzip
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("LM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(relpath: str) -> pathlib.Path:
    """Path of a file under ../shared/data: a failure under CI=true when missing, else a skip."""
    path = SHARED_DATA / relpath
    if not path.exists():
        message = f"shared data file missing: {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data():
    """`shared_data("tokenizers/cl100k_base.tiktoken")` -> pathlib.Path (skip or CI failure when absent)."""
    return shared_path


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for one test module: runs of the same program (mesh, shapes) compile it once, and a
    CLI subprocess reads it through the JAX_* environment variables this yields. A module opts in with
    `pytestmark = pytest.mark.usefixtures("compilation_cache")`; the previous settings come back afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache
    options = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
               "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: jax.config.values[name] for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()
    yield {name.upper(): str(value) for name, value in options.items()}
    for name, value in previous.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


@pytest.fixture(scope="module")
def tokens_dir(request, tmp_path_factory):
    """The first FINEWEB_DOCS FineWeb documents (a module constant, default 300), a BPE of TOKENIZER_VOCAB tokens
    (default 512) trained on them, tokenized with a 10% val split: the token directory of one test module."""
    from lm.data import tokenize
    from lm.tokenizer import train as tokenizer_train
    n_docs = getattr(request.module, "FINEWEB_DOCS", 300)
    vocab_size = getattr(request.module, "TOKENIZER_VOCAB", 512)
    root = tmp_path_factory.mktemp("fineweb_tokens")
    with gzip.open(shared_path("web/text/fineweb_sample10BT_2400docs.jsonl.gz"), "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(n_docs), f)]
    with gzip.open(root / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines)
    tokenizer = tokenizer_train.train([json.loads(line)["text"] for line in lines], vocab_size, root / "tokenizer")
    tokenize.run(tokenizer, [str(root / "docs.jsonl.gz")], root / "tokens", dict(val_fraction=0.1))
    return root / "tokens"


def new_workdir(root, tokens_dir, name) -> pathlib.Path:
    """root/name, a new run directory whose tokens/ is the shared token directory."""
    workdir = pathlib.Path(root) / name
    workdir.mkdir()
    (workdir / "tokens").symlink_to(tokens_dir)
    return workdir


def records(folder: pathlib.Path) -> list:
    """Every JSON record of the *.jsonl.gz files in `folder`, in file order."""
    out = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            out += [json.loads(line) for line in f]
    return out


# ------------------------------------------------------------------------------------------------ chat and serve
# A tiny BPE, the tiny config at a 128-token context, and random-weight runs saved as the pipeline saves them
# (tests/test_chat.py, test_serve.py, test_serve_browser.py). Module-scoped: each module gets its own workdir.

CHAT_MAX_LEN = 128
SCRIPT_THINKING, SCRIPT_ANSWER = "hmm, ü", "ok 👋 é"   # what scripted_model writes


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    from lm.tokenizer import train as tokenizer_train
    return tokenizer_train.train(list(topics.values())[:40], 512)


@pytest.fixture(scope="module")
def config(tok):
    from lm import config as lm_config
    return lm_config.load("configs/tiny.py", {"model.vocab_size": tok.n_vocab, "model.max_len": CHAT_MAX_LEN,
                                              "train.seq_len": 64})


def save_run(run_dir, config, tok, seed=0, model=None):
    """Checkpoint step 1 of `model` (default: a random Transformer from `seed`) in run_dir; returns the model."""
    from flax import nnx

    from lm import checkpoint
    from lm.model import Transformer
    model = model or Transformer(config.model, rngs=nnx.Rngs(seed))
    checkpoints = checkpoint.Checkpoints(checkpoint.checkpoint_dir(run_dir))
    checkpoints.save(1, {"params": nnx.split(model, nnx.Param, ...)[1]},
                     {"config": config.to_dict(), "tokenizer_hash": tok.hash})
    checkpoints.close()
    return model


@pytest.fixture(scope="module")
def chat_workdir(tmp_path_factory, tok, config):
    """A workdir as the pipeline leaves it: tokenizer/, a base model in checkpoints/ and an sft/ run (random)."""
    workdir = tmp_path_factory.mktemp("work")
    tok.save(workdir / "tokenizer")
    save_run(workdir, config, tok, seed=0)
    save_run(workdir / "sft", config, tok, seed=1)
    return workdir


@pytest.fixture(scope="module")
def sft_model(chat_workdir):
    from lm import checkpoint
    return checkpoint.load_run(chat_workdir / "sft")[0]


@pytest.fixture(scope="module")
def base_model(chat_workdir):
    from lm import checkpoint
    return checkpoint.load_run(chat_workdir)[0]


def scripted_model(config, tok, prompt_len):
    """A GPT-2 whose blocks add nothing, so the logits at position p favour the token whose (unit, centred)
    embedding pos_embed[p] points at: at the prompt's end it writes a think block, an answer, <|assistant_end|>."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lm.model import Transformer
    from lm.tokenizer import chat as template
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    for block in model.blocks:
        for module, names in ((block.attn, ("o", "o_bias")), (block.mlp, ("down", "down_bias"))):
            for name in names:
                getattr(module, name)[...] = jnp.zeros_like(getattr(module, name)[...])
    embed = np.random.default_rng(0).normal(size=model.embed[...].shape)
    embed -= embed.mean(1, keepdims=True)
    embed /= np.linalg.norm(embed, axis=1, keepdims=True)
    script = [tok.token_id(template.THINK_START), *tok.encode(SCRIPT_THINKING), tok.token_id(template.THINK_END),
              *tok.encode(SCRIPT_ANSWER), tok.token_id(template.ASSISTANT_END)]
    positions = np.zeros(model.pos_embed[...].shape)
    positions[prompt_len - 1:prompt_len - 1 + len(script)] = 100 * embed[script]
    model.embed[...] = jnp.asarray(embed, jnp.float32)
    model.pos_embed[...] = jnp.asarray(positions, jnp.float32)
    model.final_norm.scale[...] = jnp.full_like(model.final_norm.scale[...], 10.0)  # sharp: sampling picks it too
    return model, script

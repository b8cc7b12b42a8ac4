"""Shared test setup: 8 virtual CPU devices, offline hubs, and access to ../shared/data."""
import os

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

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


def records(folder: pathlib.Path) -> list:
    """Every JSON record of the *.jsonl.gz files in `folder`, in file order."""
    out = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            out += [json.loads(line) for line in f]
    return out

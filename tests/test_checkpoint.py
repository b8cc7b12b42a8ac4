"""lm.checkpoint: save / restore of a sharded train state with its JSON item, keep-K, restore onto another mesh,
and `load_model` for inference in a fresh process that imports neither lm.train nor TensorFlow."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import mesh as lm_mesh
from lm.model import Transformer
from lm.train import state as lm_state
from tests.conftest import REPO

MODEL = {"model.vocab_size": 96, "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 2,
         "model.d_ff": 64, "model.n_layers": 1, "model.max_len": 16, "model.dtype": "float32",
         "train.seq_len": 16}


def tiny_config(family="llama"):
    return lm_config.load(f"configs/tiny.py:{family}", MODEL)


def state_spec(config, mesh, seed=0):
    def make_model():
        return Transformer(config.model, rngs=nnx.Rngs(seed))
    tx = optax.adamw(1e-3)
    with jax.set_mesh(mesh):
        return make_model, tx, lm_state.build_spec(make_model, tx, mesh)


def sharded_state(config, mesh, seed=0):
    """A real train state (params, AdamW state, step) initialised directly sharded on `mesh`."""
    make_model, tx, spec = state_spec(config, mesh, seed)
    with jax.set_mesh(mesh):
        return spec, lm_state.init_state(make_model, tx, spec)


def logits_of(model, tokens):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens, jnp.int32)))


def test_save_restore_keep_k_and_another_mesh(tmp_path):
    config = tiny_config()
    mesh_a = lm_mesh.make_mesh(dict(data=2, fsdp=4, tensor=1))
    mesh_b = lm_mesh.make_mesh(dict(data=1, fsdp=2, tensor=4))
    _, state = sharded_state(config, mesh_a)
    checkpoints = lm_checkpoint.Checkpoints(tmp_path / "checkpoints", keep=2)
    meta = {"config": config.to_dict(), "tokenizer_hash": "abc123", "data_seed": 7}
    for step in (1, 2, 3):
        checkpoints.save(step, dict(state, step=jnp.int32(step)), meta)
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 3] and checkpoints.latest_step() == 3
    saved_meta = checkpoints.meta(3)
    checksums = saved_meta.pop(lm_checkpoint.CHECKSUMS)
    assert saved_meta == dict(json.loads(json.dumps(meta)), step=3)
    assert len(checksums) == len(jax.tree.leaves(state)) and "params/embed/value" in checksums
    checkpoints.close()

    _, _, spec_b = state_spec(config, mesh_b)
    reopened = lm_checkpoint.Checkpoints(tmp_path / "checkpoints", keep=2)
    restored, restored_meta = reopened.restore(3, spec_b.abstract)
    reopened.close()
    assert restored_meta["tokenizer_hash"] == "abc123" and int(restored["step"]) == 3
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(dict(state, step=jnp.int32(3))),
                                   jax.tree.leaves(spec_b.shardings)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == sharding
    # The MLP is split over tensor on mesh B, over fsdp on mesh A: the restore really resharded.
    up = restored["params"]["blocks"][0]["mlp"]["up"][...]
    assert "tensor" in str(up.sharding.spec) and up.sharding.mesh.shape == mesh_b.shape


def test_restore_reports_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        lm_checkpoint.load_model(tmp_path)


TOKENS = [[1, 2, 3, 4, 5]]
LOAD_SCRIPT = f"""
import json, sys
import numpy as np
import jax.numpy as jnp
from flax import nnx
from lm import checkpoint
model, config, meta = checkpoint.load_model(sys.argv[1])
logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray({TOKENS}, jnp.int32)))
heavy = [name for name in ("tensorflow", "lm.train", "torch") if name in sys.modules]
print(json.dumps(dict(logits=logits.tolist(), step=meta["step"], family=config.model.family, heavy=heavy)))
"""


def test_load_model_in_a_fresh_process(tmp_path):
    """Params saved from an FSDP-sharded train state load (on another process's 2 devices) into a Transformer whose
    logits equal the saved model's (LLaMA family: GQA, untied head)."""
    config = tiny_config("llama")
    mesh = lm_mesh.make_mesh(dict(data=1, fsdp=8, tensor=1))
    spec, state = sharded_state(config, mesh, seed=3)
    checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(tmp_path))
    checkpoints.save(5, state, {"config": config.to_dict()})
    checkpoints.close()
    expected = logits_of(nnx.merge(spec.graphdef, jax.device_get(state["params"]), spec.rest), TOKENS)

    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["step"] == 5 and loaded["family"] == "llama" and loaded["heavy"] == []
    np.testing.assert_allclose(loaded["logits"], expected, rtol=1e-5, atol=1e-6)


def small_tokenizer(directory, vocab_size):
    from lm.tokenizer import train as tokenizer_train
    text = " ".join(f"the word{i % 40} and the number {i}" for i in range(300))
    return tokenizer_train.train([text], vocab_size, directory)


def test_load_run_rebuilds_scalar_heads_and_checks_the_tokenizer(tmp_path):
    """A reward-style checkpoint (Transformer + scalar head) loads back as that model with equal scores, from the
    run directory or its checkpoints directory, with the tokenizer meta names; a tokenizer whose hash differs from
    the meta's is refused, naming both hashes."""
    from lm.model import TransformerWithScalarHead

    config = tiny_config("gpt2")
    tok = small_tokenizer(tmp_path / "tok_a", 300)
    other = small_tokenizer(tmp_path / "run_b" / "tokenizer", 290)
    assert tok.hash != other.hash
    model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(4), head_init_std=0.3)
    params = nnx.state(model, nnx.Param)
    meta = dict(config=config.to_dict(), model_kind="scalar_head", tokenizer_hash=tok.hash)
    for run, extra in ((tmp_path / "run_a", dict(tokenizer_dir=str(tmp_path / "tok_a"))), (tmp_path / "run_b", {})):
        checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(run))
        checkpoints.save(7, {"params": params}, dict(meta, **extra))
        checkpoints.close()

    rows, lengths = jnp.asarray([[1, 2, 3, 4, 5, 6]]), jnp.asarray([4])
    want = np.asarray(model.scores(rows, lengths))
    for where in (tmp_path / "run_a", tmp_path / "run_a" / "checkpoints"):
        loaded, tokenizer, loaded_config, loaded_meta = lm_checkpoint.load_run(where)
        assert type(loaded) is TransformerWithScalarHead and loaded_meta["step"] == 7
        assert tokenizer.hash == tok.hash and loaded_config.model.family == "gpt2"
        np.testing.assert_allclose(np.asarray(loaded.scores(rows, lengths)), want, rtol=1e-6)
    with pytest.raises(ValueError, match=f"tokenizer hash {other.hash} differs from {tok.hash}"):
        lm_checkpoint.load_run(tmp_path / "run_b")  # finds run_b/tokenizer, not the one it trained with
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .*\(steps: \[7\]\)"):
        lm_checkpoint.load_run(tmp_path / "run_a", step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoints here"):
        lm_checkpoint.load_run(tmp_path / "tok_a")

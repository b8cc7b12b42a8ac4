import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm import mesh as lm_mesh


def mesh_of(data, fsdp, tensor):
    return lm_mesh.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (-1, 2, 2), (1, -1, 1)])
def test_mesh_shapes(shape):
    mesh = mesh_of(*shape)
    resolved = tuple(8 // -np.prod(shape) if s == -1 else s for s in shape)
    assert tuple(mesh.shape[a] for a in lm_mesh.MESH_AXES) == resolved
    assert mesh.size == 8


@pytest.mark.parametrize("shape, words", [((3, 3, 1), "needs 9 devices"), ((3, -1, 1), "not divisible by 3"),
                                          ((-1, -1, 1), "at most one")])
def test_impossible_mesh_errors(shape, words):
    with pytest.raises(lm_mesh.MeshError, match=words):
        mesh_of(*shape)


def test_rules_table():
    assert lm_mesh.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert lm_mesh.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert lm_mesh.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    mesh = mesh_of(2, 2, 2)
    # A dimension that does not divide its mesh axes stays replicated; size-1 mesh axes are dropped.
    assert lm_mesh.logical_to_spec(("embed", "mlp"), (5, 7), mesh) == P(None, None)
    assert lm_mesh.logical_to_spec(("embed", "mlp"), (6, 8), mesh) == P("fsdp", "tensor")
    assert lm_mesh.logical_to_spec(("batch", None), (8, 3), mesh_of(8, 1, 1)) == P("data", None)
    with pytest.raises(KeyError, match="no rule"):
        lm_mesh.logical_to_spec(("nonsense",))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_matmul_equals_numpy(shape):
    mesh = mesh_of(*shape)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32), dtype=np.float32)
    w = rng.standard_normal((32, 64), dtype=np.float32)
    x_sharding = lm_mesh.named_sharding(mesh, ("batch", "embed"), x.shape)
    w_sharding = lm_mesh.named_sharding(mesh, ("embed", "mlp"), w.shape)
    out_sharding = lm_mesh.named_sharding(mesh, ("batch", "mlp"), (16, 64))
    with jax.set_mesh(mesh):
        xs, ws = jax.device_put(x, x_sharding), jax.device_put(w, w_sharding)
        y = jax.jit(jnp.matmul, out_shardings=out_sharding)(xs, ws)
    assert y.sharding.spec == out_sharding.spec
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)


def test_global_array_from_local_rows():
    mesh = mesh_of(4, 2, 1)
    data = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    assert lm_mesh.host_local_rows(16) == slice(0, 16)
    array = lm_mesh.global_array(data[lm_mesh.host_local_rows(16)], mesh, 16)
    assert array.shape == (16, 3)
    np.testing.assert_array_equal(np.asarray(array), data)


def test_flags_exist_only_in_programs():
    """Importing the modules defines no absl flags (no clash between programs); define_distributed_flags does."""
    import subprocess
    import sys
    code = ("from absl import flags\n"
            "import lm.mesh, lm.config, lm.sample, lm.main, lm.hf, lm.eval.icl, lm.eval.report\n"
            "assert not [f for f in ('coordinator_address', 'num_processes', 'process_id', 'workdir', 'config')\n"
            "            if f in flags.FLAGS], list(flags.FLAGS)\n"
            "lm.mesh.define_distributed_flags()\n"
            "flags.FLAGS(['prog', '--num_processes=3', '--process_id=1'])\n"
            "print(lm.mesh._flag('num_processes'), lm.mesh._flag('process_id'), lm.mesh._flag('coordinator_address'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "1", "None"]

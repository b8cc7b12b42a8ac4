"""One process of the 2-process test: joins jax.distributed, feeds its rows, checks a global reduction."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lm import mesh as lm_mesh  # noqa: E402


def main(port: str, process_id: str):
    lm_mesh.initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    mesh = lm_mesh.make_mesh(dict(data=-1, fsdp=2, tensor=1))
    global_data = np.arange(16 * 5, dtype=np.float32).reshape(16, 5) / 7.0
    local = global_data[lm_mesh.host_local_rows(16)]
    with jax.set_mesh(mesh):
        array = lm_mesh.global_array(local, mesh, 16)
        total = jax.jit(lambda x: jnp.sum(x * x), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(array)
    expected = float(np.sum(global_data.astype(np.float64) ** 2))
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    print(f"process {jax.process_index()} ok {float(total):.4f}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Device mesh (data / fsdp / tensor), the logical-axis rules table, and multi-host start-up.

Parameters and activations name their dimensions with logical axes ("embed", "mlp", ...). `RULES` maps each
logical axis to the mesh axes it is split over; it is the one place where the sharding strategy is written.
"""
import math
import os

import jax
import numpy as np
from absl import flags, logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None: replicated).
RULES = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
}


class MeshError(ValueError):
    """A mesh shape that the devices cannot make."""


def mesh_shape(mesh_config, n_devices: int) -> tuple:
    """Resolves the sizes of (data, fsdp, tensor); one of them may be -1, meaning the rest of the devices."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"but there are {n_devices}")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """A mesh over all (global) devices with axes data, fsdp, tensor in Auto mode."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes, shape=None, mesh=None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec through RULES.

    With `shape` and `mesh`, a dimension not divisible by its mesh axes is left replicated instead of failing,
    and a mesh axis is used at most once per array.
    """
    used = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in lm.mesh.RULES")
        target = RULES.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and axes:
            if shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def named_sharding(mesh, logical_axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array: rows over (data, fsdp)."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def define_distributed_flags() -> None:
    """--coordinator_address, --num_processes, --process_id: call it in the `__main__` block of a program that can
    run on several processes (before app.run), never at import, so importing lm.mesh defines no flags."""
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for a multi-process run (jax.distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Starts jax.distributed when the arguments, the flags of `define_distributed_flags` or the environment
    (TPU pod, SLURM) say this is a multi-host run."""
    coordinator_address = coordinator_address or _flag("coordinator_address")
    num_processes = num_processes if num_processes is not None else _flag("num_processes")
    process_id = process_id if process_id is not None else _flag("process_id")
    if coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
        jax.distributed.initialize()
    logging.info("process %d of %d; %d local devices, %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


def _flag(name):
    """A distributed flag's value, or None when the program did not define it or has not parsed its flags."""
    return flags.FLAGS[name].value if name in flags.FLAGS and flags.FLAGS.is_parsed() else None


def host_local_rows(global_batch: int) -> slice:
    """The rows of a global batch that this process feeds."""
    if global_batch % jax.process_count():
        raise MeshError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    per_process = global_batch // jax.process_count()
    return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def global_array(local_data: np.ndarray, mesh, global_batch: int):
    """Assembles each process's rows into one global array sharded over the batch axes."""
    sharding = batch_sharding(mesh, local_data.ndim)
    global_shape = (global_batch,) + local_data.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_data, global_shape)

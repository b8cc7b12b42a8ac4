"""The train state {"params", "opt_state", "step"}: its abstract shape, its shardings, and a sharded init.

Parameters are the model's `nnx.Param`s as an `nnx.State`; any other model variables ("rest") are constants
closed over by the step. The optimizer state is sharded like the parameters it mirrors (Adam's mu / nu), and
its scalars are replicated. The init is one `jax.jit` with those out_shardings, so no full copy of the state
ever exists on one device.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lm import model as lm_model


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything static about a train state: how to rebuild the model, and the state's shapes and shardings."""
    graphdef: Any
    rest: Any                  # non-Param model variables (constants of the step)
    abstract: dict             # pytree of jax.ShapeDtypeStruct (with shardings)
    shardings: dict            # pytree of NamedSharding, same structure as the state

    @property
    def param_shardings(self):
        return self.shardings["params"]

    def merge(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)


def split_params(model: nnx.Module):
    """(graphdef, params, rest) with params the model's nnx.Param variables."""
    return nnx.split(model, nnx.Param, ...)


def like_params(tree, params, param_shardings, default):
    """Shardings for `tree` (e.g. an optax state): every subtree shaped like `params` gets `param_shardings`;
    every other leaf gets `default`."""
    treedef = jax.tree.structure(params)

    def is_params(x):
        return jax.tree.structure(x) == treedef

    return jax.tree.map(lambda x: param_shardings if is_params(x) else default, tree, is_leaf=is_params)


def build_spec(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh) -> StateSpec:
    """Shapes and shardings of the state, from `nnx.eval_shape` (nothing is allocated). Call under jax.set_mesh."""
    graphdef, params, rest = split_params(nnx.eval_shape(make_model))
    param_shardings = lm_model.shardings(params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.eval_shape(tx.init, params)
    shardings = {
        "params": param_shardings,
        "opt_state": like_params(opt_state, params, param_shardings, replicated),
        "step": replicated,
    }
    shapes = {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    if jax.tree.leaves(rest):  # non-Param variables: materialise them (replicated) once
        rest = jax.jit(lambda: split_params(make_model())[2], out_shardings=replicated)()
    return StateSpec(graphdef=graphdef, rest=rest, abstract=abstract, shardings=shardings)


def init_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, spec: StateSpec) -> dict:
    """A fresh state, created directly with its shardings."""
    def init():
        _, params, _ = split_params(make_model())
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return jax.jit(init, out_shardings=spec.shardings)()


def _path_name(path) -> str:
    return "/".join(map(str, path))


def params_from_source(params, source_params, param_shardings, fresh: tuple[str, ...] = (), source: str = ""):
    """`params` (an nnx.State of fresh parameters) with every parameter `source_params` also has replaced by the
    source's value (cast to the target dtype, placed with `param_shardings`).

    A shape mismatch is an error naming the parameter and both shapes. Target parameters the source lacks must lie
    under one of the `fresh` path prefixes (e.g. "scalar_head": a new head starts fresh), else an error lists them.
    Source parameters the target lacks (e.g. a scalar head when initialising a plain policy) are dropped, with a
    warning naming them.
    """
    target = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(params)))
    given = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(source_params)))
    placement = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(param_shardings)))
    prefixes = [tuple(p.strip("/").split("/")) for p in fresh]

    def starts_fresh(path):
        names = tuple(map(str, path))
        return any(names[:len(p)] == p for p in prefixes)

    missing = sorted(_path_name(p) for p in target if p not in given and not starts_fresh(p))
    if missing:
        raise ValueError(f"init_from {source}: the model has parameters the checkpoint lacks: {missing}. Name the "
                         f"path prefixes that may start fresh in Objective.init_fresh (now {tuple(fresh)})")
    for path, value in target.items():
        if path in given and tuple(given[path].shape) != tuple(value.shape):
            raise ValueError(f"init_from {source}: parameter {_path_name(path)} has shape {tuple(given[path].shape)} "
                             f"in the checkpoint but {tuple(value.shape)} in the model")
    unused = sorted(_path_name(p) for p in given if p not in target)
    if unused:
        logging.warning("init_from %s: checkpoint parameters the model does not have are not used: %s", source, unused)
    loaded = {path: jax.device_put(given[path].astype(value.dtype), placement[path])
              for path, value in target.items() if path in given}
    fresh_paths = [_path_name(p) for p in target if p not in given]
    logging.info("init_from %s: %d parameters loaded, fresh: %s", source, len(loaded), fresh_paths or "none")
    nnx.replace_by_pure_dict(params, nnx.traversals.unflatten_mapping({**target, **loaded}))
    return params

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

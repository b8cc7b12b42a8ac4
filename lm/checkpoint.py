"""Orbax checkpoints of any dict of state pytrees plus one JSON item; restore onto the current mesh.

A checkpoint <dir>/<step>/ holds the "params" entry of the saved state dict as one orbax item (so inference
restores it alone), the other entries as a "state" item, and a "meta" JSON item (step, config, tokenizer hash,
data seed, ...). Restores always name target shardings built on the caller's mesh (`abstract_target`), so a run
can resume on another topology. Knows nothing of trainers; `load_model` (for inference) imports only the model.
"""
import logging as std_logging
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

META = "meta"
PARAMS = "params"
REST = "state"


class _OrbaxInfoFilter(std_logging.Filter):
    """Orbax logs dozens of INFO lines per save and restore; they would bury the training progress lines."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


logging.get_absl_handler().addFilter(_OrbaxInfoFilter())


def abstract_target(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (orbax then restores each shard where it belongs)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler without replica-parallel writes: those slice every replicated array with eager ops,
    compiling one tiny program per shape (about 20 s for a first save on 8 CPU devices)."""
    h = ocp.type_handlers
    registry = h.create_type_handler_registry(
        (int, h.ScalarHandler()), (float, h.ScalarHandler()), (bytes, h.ScalarHandler()),
        (np.number, h.ScalarHandler()), (np.ndarray, h.NumpyHandler()), (str, h.StringHandler()),
        (jax.Array, h.ArrayHandler(use_replica_parallel=False)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpoints:
    """<directory>/<step>/{<item>..., meta}: async saves, the newest `keep` kept."""

    def __init__(self, directory, keep: int | None = 3, async_save: bool = True, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               read_only=read_only, create=not read_only)
        handlers = {PARAMS: _pytree_handler(), REST: _pytree_handler(), META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=tuple(handlers),
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts an async save of `state` (a dict of pytrees) plus `meta` (JSON-able)."""
        items = {name: ocp.args.PyTreeSave(tree) for name, tree in _items(state).items()}
        items[META] = ocp.args.JsonSave(dict(meta, step=int(step)))
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """Restores the entries of `target` (a dict of pytrees of `abstract_target`s) and the meta item."""
        items = {name: ocp.args.PyTreeRestore(tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
                 for name, tree in _items(target).items()}
        items[META] = ocp.args.JsonRestore()
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        state = dict(restored.get(REST, {}))
        if PARAMS in restored:
            state[PARAMS] = restored[PARAMS]
        return {name: state[name] for name in target}, dict(restored[META])

    def meta(self, step: int) -> dict:
        return dict(self._manager.restore(int(step), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _items(state: dict) -> dict:
    """The orbax items of a state dict: "params" alone (so inference can restore just it) and the rest together."""
    rest = {name: tree for name, tree in state.items() if name != PARAMS}
    items = {REST: rest} if rest else {}
    if PARAMS in state:
        items[PARAMS] = state[PARAMS]
    return items


def checkpoint_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / "checkpoints"


def load_model(workdir, step: int | None = None, mesh=None, directory=None):
    """(model, config, meta): the model with the parameters of checkpoint `step` (default: latest) in `directory`
    (default: <workdir>/checkpoints).

    The model is the kind the checkpoint meta's "model_kind" names (lm.model.MODEL_KINDS: a Transformer, or a
    TransformerWithScalarHead for reward / value runs; a meta without it is a Transformer). `mesh` defaults to all
    devices as data parallel (parameters replicated unless the mesh shards them).
    """
    from flax import nnx

    from lm import mesh as lm_mesh
    from lm import model as lm_model

    checkpoints = Checkpoints(directory or checkpoint_dir(workdir), keep=None, read_only=True)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
        if step not in checkpoints.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoints.directory} "
                                    f"(steps: {checkpoints.all_steps()})")
        meta = checkpoints.meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        kind = meta.get("model_kind", "transformer")
        mesh = mesh if mesh is not None else lm_mesh.make_mesh(dict(data=-1, fsdp=1, tensor=1))
        with jax.set_mesh(mesh):
            abstract = nnx.eval_shape(lambda: lm_model.build(config.model, kind, rngs=nnx.Rngs(0)))
            graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
            if jax.tree.leaves(rest):
                raise ValueError(f"load_model restores parameters only, but the model also has {rest}")
            target = abstract_target(abstract_params, lm_model.shardings(abstract_params, mesh))
            restored, _ = checkpoints.restore(step, {PARAMS: target})
            model = nnx.merge(graphdef, restored[PARAMS], rest)
    finally:
        checkpoints.close()
    logging.info("loaded %s step %d (%s)", checkpoints.directory, step, kind)
    return model, config, meta


def find_checkpoints(run) -> pathlib.Path:
    """The checkpoints directory of `run`: a run directory holding checkpoints/, or a checkpoints directory."""
    run = pathlib.Path(run)
    for candidate in (checkpoint_dir(run), run):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    raise FileNotFoundError(f"{run}: no checkpoints here (expected {checkpoint_dir(run)}/<step>/)")


def find_tokenizer_dir(run, meta: dict) -> pathlib.Path:
    """Where a run's tokenizer lives: meta's tokenizer_dir, else <run>/tokenizer, else the workdir's (a stage
    run such as <workdir>/sft/ shares <workdir>/tokenizer)."""
    run = pathlib.Path(run)
    candidates = [pathlib.Path(meta["tokenizer_dir"])] if meta.get("tokenizer_dir") else []
    candidates += [run / "tokenizer", run.parent / "tokenizer", run.parent.parent / "tokenizer"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{run}: no tokenizer found (looked in {', '.join(map(str, candidates))})")


def load_run(run, step: int | None = None, mesh=None):
    """(model, tokenizer, config, meta) of a run directory (or its checkpoints directory) at `step` (default: latest).

    The model is the kind the run saved (`load_model`): a reward / value run gives a TransformerWithScalarHead
    (which is also a Transformer: `model(tokens)` gives logits, `model.scores(tokens, lengths)` its scalar).
    The tokenizer is found by `find_tokenizer_dir` and must be the one the run trained with: a hash that differs
    from the checkpoint meta's is an error naming both (a meta without a hash is loaded with a warning).
    """
    from lm import tokenizer as lm_tokenizer

    directory = find_checkpoints(run)
    model, config, meta = load_model(run, step=step, mesh=mesh, directory=directory)
    tokenizer_dir = find_tokenizer_dir(run, meta)
    tokenizer = lm_tokenizer.load(tokenizer_dir)
    want = meta.get("tokenizer_hash")
    if not want:
        logging.warning("%s step %s records no tokenizer hash: cannot check %s", directory, meta.get("step"),
                        tokenizer_dir)
    elif tokenizer.hash != want:
        raise ValueError(f"{tokenizer_dir}: tokenizer hash {tokenizer.hash} differs from {want}, the hash in the meta "
                         f"of checkpoint {directory}/{meta.get('step')} (the tokenizer it was trained with)")
    return model, tokenizer, config, meta

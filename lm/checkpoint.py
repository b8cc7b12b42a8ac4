"""Orbax checkpoints of any dict of state pytrees plus one JSON item; restore onto the current mesh.

A checkpoint <dir>/<step>/ holds the "params" entry of the saved state dict as one orbax item (so inference
restores it alone), the other entries as a "state" item, and a "meta" JSON item (step, config, tokenizer hash,
data seed, ...). Restores always name target shardings built on the caller's mesh (`abstract_target`), so a run
can resume on another topology. Knows nothing of trainers; `load_model` (for inference) imports only the model.

Faults: every save records a checksum of each array in the meta ("checksums"; computed on the devices, equal on
any mesh), and every restore checks them, so a flipped bit in a data file (which orbax would read back silently)
is found. A checkpoint that cannot be read (truncated or altered files, garbage metadata, a wrong checksum) raises
`CorruptCheckpoint` naming its directory and the cause; `restore_newest` then falls back to the newest checkpoint
that restores and moves the bad ones aside to <checkpoints>/corrupt/<step>-<time>/ (never deleting them). A
checkpoint whose arrays do not fit the target (another model config) raises `IncompatibleCheckpoint`, naming the
config keys that differ from the checkpoint's saved config and what to do.
"""
import datetime
import functools
import logging as std_logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

META = "meta"
PARAMS = "params"
REST = "state"
CHECKSUMS = "checksums"
CORRUPT = "corrupt"  # <checkpoints>/corrupt/<step>-<time>/: checkpoints that failed to restore, moved aside


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back as saved; the message names its directory and the cause."""

    def __init__(self, path, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = pathlib.Path(path), cause


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint whose arrays do not fit the target state (the model or optimizer config changed)."""


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
        self.read_only = read_only

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(int(step))

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts an async save of `state` (a dict of pytrees) plus `meta` (JSON-able) with the state's checksums."""
        items = {name: ocp.args.PyTreeSave(tree) for name, tree in _items(state).items()}
        items[META] = ocp.args.JsonSave(dict(meta, step=int(step), **{CHECKSUMS: checksums(state)}))
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target: dict, config: dict | None = None) -> tuple[dict, dict]:
        """Restores the entries of `target` (a dict of pytrees of `abstract_target`s) and the meta item.

        Raises IncompatibleCheckpoint when the saved arrays do not fit `target` (naming the keys in which `config`,
        the current config as a dict, differs from the saved one), CorruptCheckpoint when the checkpoint cannot be
        read or its arrays do not match their checksums.
        """
        path = self.path(step)
        self._check_fits(step, target, config)
        items = {name: ocp.args.PyTreeRestore(tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
                 for name, tree in _items(target).items()}
        items[META] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        except Exception as error:  # tensorstore, JSON and file errors alike: the files are not what was saved
            raise CorruptCheckpoint(path, _describe(error)) from error
        state = dict(restored.get(REST, {}))
        if PARAMS in restored:
            state[PARAMS] = restored[PARAMS]
        state, meta = {name: state[name] for name in target}, dict(restored[META])
        _verify_checksums(path, state, meta)
        return state, meta

    def restore_newest(self, target: dict, config: dict | None = None) -> tuple[int, dict, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores (None: there are none).

        Each newer one that fails is reported (path and error) and, unless read-only, moved aside to
        <checkpoints>/corrupt/. If none restores, CorruptCheckpoint lists them all and nothing is moved: the
        reason may lie outside the files. IncompatibleCheckpoint (another config) is raised at once.
        """
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, target, config)
            except CorruptCheckpoint as error:
                logging.warning("checkpoint %s does not restore: %s", error.path, error.cause)
                failed.append(error)
                continue
            for error in failed:
                self._set_aside(error)
            return step, state, meta
        if failed:
            raise CorruptCheckpoint(self.directory, "no checkpoint restores: " + "; ".join(map(str, failed)) +
                                    f". Move them out of {self.directory} (or delete it) to start afresh")
        return None

    def _set_aside(self, error: CorruptCheckpoint) -> None:
        if self.read_only:
            logging.warning("skipped %s (read-only: left where it is)", error.path)
            return
        if jax.process_index() == 0:
            when = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            destination = self.directory / CORRUPT / f"{error.path.name}-{when}"
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(error.path), str(destination))
            (destination / "WHY.txt").write_text(error.cause + "\n")
            logging.warning("moved the corrupt checkpoint %s to %s (not deleted); resuming from an older one",
                            error.path, destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"lm.checkpoint set aside {error.path.name}")
        self._manager.reload()

    def _check_fits(self, step: int, target: dict, config: dict | None) -> None:
        """IncompatibleCheckpoint when the saved arrays' paths or shapes differ from the target's."""
        path = self.path(step)
        try:
            saved_items = self._manager.item_metadata(int(step))
            saved = {}
            for item, prefix in ((PARAMS, (PARAMS,)), (REST, ())):
                tree = saved_items.get(item) if hasattr(saved_items, "get") else None
                if tree is not None:
                    saved.update(_shapes(getattr(tree, "tree", tree), prefix))
        except Exception as error:
            raise CorruptCheckpoint(path, "unreadable metadata: " + _describe(error)) from error
        wanted = _shapes(target)
        if not saved:
            raise CorruptCheckpoint(path, "no arrays in its metadata")
        entries = {name.split("/")[0] for name in wanted}  # a params-only target ignores the rest
        saved = {name: shape for name, shape in saved.items() if name.split("/")[0] in entries}
        def order(name):  # parameters first: they say most about the model
            return not name.startswith(PARAMS + "/"), name

        problems = [f"{name}: shape {saved[name]} saved, {wanted[name]} wanted"
                    for name in sorted(set(wanted) & set(saved), key=order) if saved[name] != wanted[name]]
        problems += [f"{name}: not in the checkpoint" for name in sorted(set(wanted) - set(saved), key=order)]
        problems += [f"{name}: saved, not in this state" for name in sorted(set(saved) - set(wanted), key=order)]
        if not problems:
            return
        raise IncompatibleCheckpoint(_incompatible_message(path, problems, self._saved_config(step), config))

    def _saved_config(self, step: int) -> dict | None:
        try:
            return self.meta(step).get("config")
        except Exception:  # an unreadable meta: the message says the config could not be compared
            return None

    def meta(self, step: int) -> dict:
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        except Exception as error:
            raise CorruptCheckpoint(self.path(step), "unreadable meta: " + _describe(error)) from error
        return dict(restored[META])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _describe(error: BaseException) -> str:
    """An exception as one readable line: its type and the first 300 characters of its message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _leaves(tree, prefix=()) -> dict:
    """{"a/b/0/c": leaf} of a pytree (dict keys, sequence indices and attribute names alike)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join((*prefix, *map(_key_name, path))): leaf for path, leaf in flat}


def _shapes(tree, prefix=()) -> dict:
    return {name: tuple(leaf.shape) for name, leaf in _leaves(tree, prefix).items() if hasattr(leaf, "shape")}


def _incompatible_message(path, problems: list, saved: dict | None, current: dict | None) -> str:
    shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
    message = f"{path}: the checkpoint does not fit this run's state ({shown})."
    if saved is not None and current is not None:
        changed = [d for d in config_differences(saved, current) if not d.startswith("train.steps:")]
        if changed:
            message += " This config differs from the checkpoint's saved config (meta['config']) in: " + \
                       ", ".join(changed) + "."
    elif current is not None:
        message += " (The checkpoint's saved config could not be read to compare.)"
    return message + (f" To train this config, use a new --workdir, or start over in this one: python -m lm.main "
                      f"--force, or delete {pathlib.Path(path).parent}. To resume this run, restore its config.")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """["model.d_model: 64 -> 128", ...]: the dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _plain(value):
    """Tuples and lists compare equal (a config saved as JSON comes back with lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@functools.cache
def _fingerprint_fn():
    def fingerprint(x):
        """Two uint32 sums of the array's bits weighted by position: any single flipped bit changes the first
        (odd weights), and both are exact integer sums, so the value does not depend on the sharding."""
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        size = x.dtype.itemsize
        if size == 8:
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif size == 4:
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            words = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)
        index = jnp.zeros(words.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(words.ndim)):  # the flat position, without a reshape (no resharding)
            index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2 ** 32)
            stride *= words.shape[axis]
        first = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
        mixed = (words ^ (words >> 15)) * (index * jnp.uint32(0x9E3779B1) | 1)
        return jnp.stack([first, jnp.sum(mixed, dtype=jnp.uint32)])

    return jax.jit(lambda leaves: [fingerprint(x) for x in leaves])


def checksums(state: dict) -> dict:
    """{"params/embed": "0123abcd89ef4567", ...}: a 64-bit checksum of every array of `state` (on its devices)."""
    named = _leaves(state)
    if not named:
        return {}
    values = _fingerprint_fn()(list(named.values()))
    out = {}
    for name, value in zip(named, values):
        words = jax.device_get(value.addressable_data(0))  # replicated: any shard is the whole value
        out[name] = f"{int(words[0]):08x}{int(words[1]):08x}"
    return out


def _verify_checksums(path, state: dict, meta: dict) -> None:
    saved = meta.get(CHECKSUMS)
    if not saved:
        return  # a checkpoint from before checksums existed
    now = checksums(state)
    wrong = sorted(name for name, value in now.items() if name in saved and saved[name] != value)
    if wrong:
        raise CorruptCheckpoint(path, f"{len(wrong)} arrays differ from their checksums at save time "
                                      f"({', '.join(wrong[:5])}{', ...' if len(wrong) > 5 else ''})")


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
        if not checkpoints.all_steps():
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
        if step is not None and step not in checkpoints.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoints.directory} "
                                    f"(steps: {checkpoints.all_steps()})")
        meta = checkpoints.meta(step) if step is not None else _newest_meta(checkpoints)
        config = ml_collections.ConfigDict(meta["config"])
        kind = meta.get("model_kind", "transformer")
        mesh = mesh if mesh is not None else lm_mesh.make_mesh(dict(data=-1, fsdp=1, tensor=1))
        with jax.set_mesh(mesh):
            abstract = nnx.eval_shape(lambda: lm_model.build(config.model, kind, rngs=nnx.Rngs(0)))
            graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
            if jax.tree.leaves(rest):
                raise ValueError(f"load_model restores parameters only, but the model also has {rest}")
            target = {PARAMS: abstract_target(abstract_params, lm_model.shardings(abstract_params, mesh))}
            if step is not None:
                restored, meta = checkpoints.restore(step, target)
            else:  # the newest that restores (read-only: a corrupt newer one is reported and left in place)
                step, restored, meta = checkpoints.restore_newest(target)
            model = nnx.merge(graphdef, restored[PARAMS], rest)
    finally:
        checkpoints.close()
    logging.info("loaded %s step %d (%s)", checkpoints.directory, step, kind)
    return model, config, meta


def _newest_meta(checkpoints: Checkpoints) -> dict:
    """The meta of the newest checkpoint whose meta reads (a corrupt newer one is reported and skipped)."""
    steps = sorted(checkpoints.all_steps(), reverse=True)
    for step in steps:
        try:
            return checkpoints.meta(step)
        except CorruptCheckpoint as error:
            if step == steps[-1]:
                raise
            logging.warning("skipping checkpoint %s", error)


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

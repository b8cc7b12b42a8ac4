"""The one training loop: a `Trainer` owns the mesh, the sharded state (restored, initialised from another run, or
fresh), the compiled step, evaluation, checkpoints and the metrics writer; an `Objective` supplies only the model, a
loss, its batches and its evaluations. `train()` is a short driver over a Trainer; an RL learner instead calls
`trainer.step(batch)` between its own rollouts.

    with Trainer(config, workdir, objective) as trainer:      # mesh -> optimizer -> state -> writer
        for batch in trainer.train_batches():                 # the objective's batches from the current step
            record = trainer.step(batch)                      # update, checkpoint / eval when due, metrics line
            if trainer.current_step >= trainer.total_steps:
                break

Live parameters: `trainer.current_model()` is an nnx model merged from the parameters as they are now. Each step
donates the state (its buffers are reused for the next one), so such a model is valid only until the next
`trainer.step`: call `current_model()` again for every batch, never keep one across steps. An on-policy batch
source (`Objective(on_policy=True)`) is called as `train_batches(start_step, current_model)` and does exactly that
each time it makes a batch (the loop asks for the batch of step s only after step s - 1 has run).
"""
import contextlib
import ctypes
import dataclasses
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lm
from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import mesh as lm_mesh
from lm import model as lm_model
from lm import progress as lm_progress
from lm.train import metrics as lm_metrics
from lm.train import optim
from lm.train import state as lm_state

Batch = dict  # name -> numpy array [rows of this process, ...]; optionally BATCH_METRICS -> {name: number}
BATCH_METRICS = "metrics"  # a batch's own numbers (e.g. a rollout's mean reward): logged with its step, not trained on


@dataclasses.dataclass
class Objective:
    """What a trainer supplies.

    loss(model, batch) -> (loss_sum, weight, metric_sums): summed over the batch (weight: e.g. the number of
        scored tokens, or of preference pairs); the loop reports loss_sum / weight and each metric_sum / weight.
        Sums, not means, make gradient accumulation exactly the large batch.
    train_batches(start_step) -> iterator of this process's rows of the batches from 0-based index start_step on
        (the batch of step s has index s - 1, so a resumed run continues the same sequence);
        with on_policy=True, train_batches(start_step, current_model), current_model() -> the live nnx model
        (see the module doc for how long it is valid). A batch may hold BATCH_METRICS: {name: number}, logged
        with the step (this process's numbers; process 0 writes them).
    make_model() -> a fresh nnx model (with its rngs); called under the mesh, also abstractly. A model of a
        lm.model.MODEL_KINDS class is recorded in the checkpoint meta ("model_kind") so load_run rebuilds it.
    eval_batches() -> iterable of this process's rows of the eval batches (or None: no eval). Logged as val_loss
        and val_<metric>; if it yields nothing, eval is skipped with one warning.
    evals: name -> fn(model) -> {key: number}: extra evaluations on the live model, run with the eval batches
        (every config.train.eval_every steps and at the last), logged as "<name>/<key>".
    flops_per_token: model FLOPs per processed token (forward + backward), for MFU.
    meta: JSON-able facts saved with every checkpoint (objective name, tokenizer hash and dir, data seed, ...).
    checkpoint_meta: model -> {key: JSON-able}: facts about the parameters being saved, computed from the live model
        at each checkpoint and added to that checkpoint's meta (e.g. a reward model's score mean / std).
    init_from: a run directory or checkpoints directory whose parameters (checkpoint init_step, default the latest)
        start a fresh run: shapes must match; parameters of the model that the checkpoint lacks must lie under a
        path prefix in init_fresh (e.g. ("scalar_head",)). Ignored when the run has checkpoints of its own (it
        resumes from them). The meta records where the parameters came from ("init_from": run, step, objective).
    """
    loss: Callable[[Any, Batch], tuple]
    train_batches: Callable[..., Iterator[Batch]]
    make_model: Callable[[], Any]
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    flops_per_token: float = 0.0
    meta: dict = dataclasses.field(default_factory=dict)
    on_policy: bool = False
    evals: dict = dataclasses.field(default_factory=dict)
    init_from: str | pathlib.Path | None = None
    init_step: int | None = None
    init_fresh: tuple = ()
    checkpoint_meta: Callable[[Any], dict] | None = None


# --- Steps ---------------------------------------------------------------------------------------------------------

def make_loss_sum_and_grad(objective: Objective, spec: lm_state.StateSpec):
    """params, batch -> ((loss_sum, weight, metric_sums), grads of loss_sum)."""
    def loss_of_params(params, batch):
        loss_sum, weight, sums = objective.loss(spec.merge(params), batch)
        return loss_sum, (weight, sums)

    def loss_sum_and_grad(params, batch):
        (loss_sum, (weight, sums)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params, batch)
        return (loss_sum, weight, sums), grads

    return loss_sum_and_grad


def make_train_step(objective: Objective, spec: lm_state.StateSpec, tx, schedule, grad_accum: int, mesh):
    """state, batch -> state, metrics: one optimizer update on the (accumulated) mean loss.

    metrics: loss, grad_norm, lr, each metric_sum / weight, and "tokens", the scored tokens (sum of the global
    batch's loss_mask) when the batch has a loss_mask.
    """
    loss_sum_and_grad = make_loss_sum_and_grad(objective, spec)

    def micro_sharding(ndim):
        return lm_mesh.batch_sharding(mesh, ndim)

    def train_step(state, batch):
        (loss_sum, weight, sums), grads = optim.accumulate_gradients(
            loss_sum_and_grad, state["params"], batch, grad_accum, micro_sharding)
        weight = jnp.maximum(weight, 1)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss_sum / weight, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   **{name: value / weight for name, value in sums.items()}}
        if "loss_mask" in batch:
            metrics["tokens"] = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(objective: Objective, spec: lm_state.StateSpec):
    """params, batch -> (loss_sum, weight, metric_sums)."""
    def eval_step(params, batch):
        return objective.loss(spec.merge(params), batch)
    return eval_step


def global_batch(local: Batch, mesh) -> dict:
    """This process's rows -> global arrays sharded over the batch axes (BATCH_METRICS is not part of it)."""
    return {name: lm_mesh.global_array(np.asarray(value), mesh, value.shape[0] * jax.process_count())
            for name, value in local.items() if name != BATCH_METRICS}


def abstract_batch(batch: dict) -> dict:
    """ShapeDtypeStructs (with shardings) of a global batch, for lowering."""
    return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in batch.items()}


def train_step_compiler_options(train_config, mesh) -> dict:
    """Per-compile XLA options of the train step (only it gets them; sampling, decoding and evals compile at XLA's
    defaults). On a CPU mesh without train.cpu_ynn_fusions: YNNPACK fusions off (see lm/__init__.py for what that
    wins and loses), unless XLA_FLAGS sets the fusion type (the user's flag, or LM_XLA_DEFAULTS=1's): a compile
    option would override it, so then there is none. Other backends get nothing (they reject CPU options)."""
    if train_config.get("cpu_ynn_fusions", False) or f"--{lm.YNN_FUSION_TYPE}" in lm.xla_flags_given():
        return {}
    if not _cpu_mesh(mesh):
        return {}
    return {lm.YNN_FUSION_TYPE: ""}


def _cpu_mesh(mesh) -> bool:
    return all(device.platform == "cpu" for device in mesh.devices.flat)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept_heap = 0  # the heap trim threshold keep_cpu_heap set (bytes)


def keep_cpu_heap(temp_bytes: int) -> None:
    """Keeps the pages of a CPU program's temp buffer mapped from one call to the next (Linux, glibc).

    XLA's CPU runtime allocates a compiled program's temp buffer (all its intermediates, one block) on every call.
    glibc serves a block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so each
    train step page-faulted its whole temp buffer in again, zero-filled by the kernel: at bench_train's small shape
    (45 MiB of temps) 11.5k faults and ~22 ms of system time in a ~100 ms step, none of it in the step's parts timed
    alone (their temps, under 32 MiB, are reused from the heap). Large blocks from the heap (mmap off) with the heap
    trimmed only above twice the largest temp buffer keep those pages. Where the executing thread allocates from a
    non-main glibc arena (heaps of at most 64 MiB), larger temp buffers are still mmapped each call (bench_train's
    medium shape: ~290 MiB, 75k faults a step; MALLOC_ARENA_MAX=1 at process start removes them, without a faster
    step in a contended A/B). Skipped off glibc, and when the environment sets MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ (the user's choice)."""
    global _kept_heap
    if any(name in os.environ for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return
    threshold = min(2 * temp_bytes + (64 << 20), 2 ** 31 - 1)
    if threshold <= _kept_heap:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, threshold)):
            return
    except (OSError, AttributeError):  # not glibc
        return
    _kept_heap = threshold
    logging.info("CPU heap: mmap off, trimmed above %d MiB (temp buffers stay mapped across steps)", threshold >> 20)


def compile_train_step(train_step, spec: lm_state.StateSpec, batch_shapes: dict, mesh, train_config):
    """jax.jit with explicit shardings and the state donated, lowered and compiled once with
    `train_step_compiler_options`; logs memory and FLOPs. On CPU, `keep_cpu_heap` for its temp buffer."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: x.sharding for name, x in batch_shapes.items()}
    jitted = jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings),
                     out_shardings=(spec.shardings, replicated), donate_argnums=0)
    options = train_step_compiler_options(train_config, mesh)
    compiled = jitted.lower(spec.abstract, batch_shapes).compile(compiler_options=options or None)
    info = log_compiled(compiled, "train step" + "".join(f", {k}={v!r}" for k, v in options.items()))
    if _cpu_mesh(mesh):
        keep_cpu_heap(info.get("temp_size_in_bytes", 0))
    return compiled


def fresh_state_and_step(objective: Objective, train_config, mesh, example_batch: dict):
    """A freshly initialised sharded state and the train step compiled for global batches like `example_batch`
    (benchmarks and tools that need a step without the loop's checkpoints and data)."""
    tx = optim.make_optimizer(train_config)
    spec = lm_state.build_spec(objective.make_model, tx, mesh)
    state = lm_state.init_state(objective.make_model, tx, spec)
    train_step = make_train_step(objective, spec, tx, optim.learning_rate(train_config),
                                 int(train_config.get("grad_accum", 1)), mesh)
    return state, compile_train_step(train_step, spec, abstract_batch(example_batch), mesh, train_config)


def log_compiled(compiled, name: str) -> dict:
    """Logs (and returns) XLA's memory analysis and FLOP count of a compiled function."""
    info = {}
    memory = compiled.memory_analysis()
    if memory is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "alias_size_in_bytes", "generated_code_size_in_bytes"):
            info[field] = int(getattr(memory, field, 0) or 0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost:
        info["xla_flops"] = float(cost.get("flops", 0.0))
    logging.info("%s compiled: %s", name, ", ".join(f"{k}={v:,.0f}" for k, v in info.items()))
    return info


def evaluate(eval_step, params, batches: Iterable[Batch], mesh) -> dict:
    """{"val_loss": weighted mean loss, "val_<metric>": ...} over `batches`; {} if they hold no weight at all."""
    total, weight, sums = 0.0, 0.0, {}
    for local in batches:
        loss_sum, w, metric_sums = jax.device_get(eval_step(params, global_batch(local, mesh)))
        total, weight = total + float(loss_sum), weight + float(w)
        for name, value in metric_sums.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    if not weight:
        return {}
    return {"val_loss": total / weight, **{f"val_{name}": value / weight for name, value in sums.items()}}


def all_tokens(local: Batch) -> int:
    """Token positions of this process's rows, padding included (loss_mask's size, else inputs')."""
    for name in ("loss_mask", "inputs"):
        if name in local:
            return int(np.size(local[name]))
    return 0


# --- The Trainer ---------------------------------------------------------------------------------------------------

class Trainer:
    """Mesh, optimizer, state (restored / init_from / fresh), compiled step, eval, checkpoints, metrics of one run.

    Use as a context manager (the mesh is set inside it; `close()` waits for the last checkpoint). Attributes:
    mesh, spec (lm.train.state.StateSpec), state ({"params", "opt_state", "step"}), start_step (where this
    process started), current_step, total_steps (config.train.steps), meta (saved with every checkpoint),
    records (this run's metric records).
    """

    def __init__(self, config, workdir, objective: Objective):
        self.config, self.workdir, self.objective = config, pathlib.Path(workdir), objective
        train = config.train
        self.total_steps = int(train.steps)
        self.eval_every = int(train.get("eval_every", 0))
        self.checkpoint_every = int(train.get("checkpoint_every", 0))
        self.log_every = max(int(train.get("log_every", 1)), 1)
        self._started = time.perf_counter()
        self.peak = lm_metrics.peak_flops()  # before the mesh is set: on CPU it times a matmul on one device
        self.mesh = lm_mesh.make_mesh(config.mesh)
        logging.info("mesh %s over %d devices", dict(self.mesh.shape), self.mesh.size)
        _check_batch_splits(train, self.mesh)
        self._stack = contextlib.ExitStack()
        self._compiled = {}  # batch signature -> compiled train step
        self._eval_step = None
        self._warned_no_eval = False
        self.records = []
        try:
            with jax.set_mesh(self.mesh):
                self._build_state()
        except BaseException:
            self._stack.close()
            raise

    # --- optimizer, state shapes and shardings, state, writer ---
    def _build_state(self):
        train = self.config.train
        self.tx = optim.make_optimizer(train)
        self.schedule = optim.learning_rate(train)
        self.spec = lm_state.build_spec(self.objective.make_model, self.tx, self.mesh)
        self.n_params = sum(x.size for x in jax.tree.leaves(self.spec.abstract["params"]))
        logging.info("parameters: %s", f"{self.n_params:,}")
        self.meta = dict(self.objective.meta, config=self.config.to_dict())
        kind = _model_kind(self.objective.make_model)
        if kind:
            self.meta["model_kind"] = kind
        self.checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(self.workdir),
                                                     keep=train.get("keep_checkpoints", 3))
        self._stack.callback(self.checkpoints.close)
        try:  # the newest checkpoint that restores; corrupt newer ones are moved aside (lm.checkpoint)
            restored = self.checkpoints.restore_newest(self.spec.abstract, config=self.config.to_dict())
        except lm_checkpoint.IncompatibleCheckpoint as error:
            raise lm_config.ConfigError(str(error)) from None
        self.start_step = restored[0] if restored else 0
        if restored:
            _, self.state, restored_meta = restored
            if "init_from" in restored_meta:  # where this run's parameters first came from
                self.meta["init_from"] = restored_meta["init_from"]
            logging.info("resumed from %s at step %d", self.checkpoints.directory, self.start_step)
            _report_config_changes(restored_meta.get("config"), self.config, self.start_step,
                                   f"{self.checkpoints.directory}/{self.start_step}")
            if self.objective.init_from:
                logging.info("init_from %s not used: the run resumes from its own checkpoints",
                             self.objective.init_from)
        else:
            self.state = lm_state.init_state(self.objective.make_model, self.tx, self.spec)
            if self.objective.init_from:
                self._init_params_from(self.objective.init_from, self.objective.init_step)
        self.current_step = self.start_step
        self._saved_step = self.start_step or None
        self.writer = lm_metrics.MetricsWriter(self.workdir, resume_step=self.start_step)
        self._stack.callback(self.writer.close)
        self.progress = lm_progress.Progress("train", total=self.total_steps, unit="steps", start=self.start_step,
                                             enabled=jax.process_index() == 0)
        self._stack.callback(self.progress.close)

    def _init_params_from(self, run, step):
        """The parameters of another run's checkpoint (checked against this model), the rest of the state fresh."""
        directory = lm_checkpoint.find_checkpoints(run)
        source, _, source_meta = lm_checkpoint.load_model(None, step=step, mesh=self.mesh, directory=directory)
        where = f"{directory}/{source_meta['step']}"
        self.state["params"] = lm_state.params_from_source(
            self.state["params"], nnx.state(source, nnx.Param), self.spec.param_shardings,
            fresh=tuple(self.objective.init_fresh), source=where)
        self.meta["init_from"] = dict(run=str(pathlib.Path(run).absolute()), checkpoints=str(directory),
                                      step=int(source_meta["step"]), objective=source_meta.get("objective"))
        logging.info("parameters from %s (objective %s)", where, source_meta.get("objective"))

    def __enter__(self):
        self._stack.enter_context(jax.set_mesh(self.mesh))
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Waits for pending checkpoint saves and closes the metrics writer."""
        self._stack.close()

    # --- the live model and the data ---
    def current_model(self):
        """An nnx model merged from the current parameters: valid until the next `step` (which donates them)."""
        return self.spec.merge(self.state["params"])

    def train_batches(self) -> Iterator[Batch]:
        """The objective's batches from the current step on (on-policy ones read `current_model`)."""
        if self.objective.on_policy:
            return self.objective.train_batches(self.current_step, self.current_model)
        return self.objective.train_batches(self.current_step)

    # --- one step ---
    def step(self, local_batch: Batch) -> dict:
        """One optimizer update on this process's rows `local_batch`; then the checkpoint (when due), then the evals
        (when due), then one metrics line. Returns the step's record (host floats)."""
        with jax.set_mesh(self.mesh):
            batch = global_batch(local_batch, self.mesh)
            compiled = self._compiled_step(batch)
            step = self.current_step + 1
            tick = time.perf_counter()
            self.state, step_metrics = compiled(self.state, batch)
            record = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
            seconds = time.perf_counter() - tick
            self.current_step = step
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {step}: stopping ({self.workdir})")
            record.update(self._throughput(local_batch, record, seconds))
            record.update(self._batch_metrics(local_batch, record))
            checkpointed = _due(step, self.checkpoint_every, self.total_steps)
            if checkpointed:
                self.save()  # before the evals: a failing eval loses nothing
            try:
                if self.eval_every > 0 and _due(step, self.eval_every, self.total_steps):
                    record.update(self.evaluate())
            finally:
                self.writer.write(step, record)
                if checkpointed:  # TensorBoard holds every step up to the checkpoint a resume starts from
                    self.writer.flush()
                self.records.append(dict(record, step=step))
        self.progress.update(step, note=f"loss {record['loss']:.4g}")
        if step % self.log_every == 0 or step in (self.start_step + 1, self.total_steps):
            logging.info("step %d/%d: %s", step, self.total_steps,
                         ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
        return record

    def _compiled_step(self, batch: dict):
        """The train step compiled for this batch's shapes (compiled once per distinct shape)."""
        signature = tuple(sorted((name, x.shape, str(x.dtype)) for name, x in batch.items()))
        if signature not in self._compiled:
            if self._compiled:
                logging.warning("new batch shapes %s: compiling the train step again", signature)
            train_step = make_train_step(self.objective, self.spec, self.tx, self.schedule,
                                         int(self.config.train.get("grad_accum", 1)), self.mesh)
            self._compiled[signature] = compile_train_step(train_step, self.spec, abstract_batch(batch), self.mesh,
                                                           self.config.train)
            tokens = all_tokens(batch)
            logging.info("model FLOPs per step: %.3e (%d tokens x %.3e FLOPs/token)",
                         tokens * self.objective.flops_per_token, tokens, self.objective.flops_per_token)
        return self._compiled[signature]

    def _throughput(self, local_batch: Batch, record: dict, seconds: float) -> dict:
        """Scored tokens/s (from loss_mask), all tokens/s (padding included) and MFU (on all tokens: FLOPs are
        spent on padding too)."""
        processed = all_tokens(local_batch) * jax.process_count()
        scored = record.get("tokens", processed)
        return {"tokens_per_sec": scored / seconds, "all_tokens_per_sec": processed / seconds,
                "mfu": processed / seconds * self.objective.flops_per_token / self.peak}

    def _batch_metrics(self, local_batch: Batch, record: dict) -> dict:
        values = {name: float(value) for name, value in (local_batch.get(BATCH_METRICS) or {}).items()}
        clash = sorted(set(values) & set(record))
        if clash:
            raise ValueError(f"batch metrics {clash} clash with the step's own metrics: rename them")
        return values

    # --- evaluation and checkpoints ---
    def evaluate(self) -> dict:
        """val_loss / val_<metric> over the objective's eval batches, and "<name>/<key>" for each extra eval."""
        out = {}
        with jax.set_mesh(self.mesh):
            if self.objective.eval_batches is not None and not self._warned_no_eval:
                if self._eval_step is None:
                    self._eval_step = jax.jit(make_eval_step(self.objective, self.spec))
                values = evaluate(self._eval_step, self.state["params"], self.objective.eval_batches(), self.mesh)
                if not values:
                    logging.warning("no eval batches (empty validation split?): skipping eval in %s", self.workdir)
                    self._warned_no_eval = True
                out.update(values)
            if self.objective.evals:
                model = self.current_model()
                for name, fn in self.objective.evals.items():
                    out.update({f"{name}/{key}": float(value) for key, value in fn(model).items()})
        return out

    def save(self) -> None:
        """Starts an async save of the state at the current step (with `meta`, and the objective's checkpoint_meta of
        the current model); `close()` waits for it."""
        if self.current_step != self._saved_step:
            meta = self.meta
            if self.objective.checkpoint_meta is not None:
                meta = dict(meta, **self.objective.checkpoint_meta(self.current_model()))
            self.checkpoints.save(self.current_step, self.state, meta)
            self._saved_step = self.current_step

    def summary(self) -> dict:
        """Final numbers: this run's records, or the earlier ones when there was nothing left to train."""
        records = self.records or _previous_records(self.writer)
        return _summary(records, self.start_step, self.n_params, self.objective.flops_per_token, self.peak,
                        self._started)


# --- The driver ----------------------------------------------------------------------------------------------------

def train(config, workdir, objective: Objective, stop_after: int | None = None) -> dict:
    """Trains to `config.train.steps` total steps, resuming from the latest checkpoint in `workdir`.

    Metrics go to <workdir>/metrics.jsonl and tb/ every step, evals every `eval_every` steps and at the end
    (eval_every 0: never), checkpoints every `checkpoint_every` steps and at the end (before the final eval).
    `stop_after` ends the run after that step as a kill right after it would (no final checkpoint or eval): it
    exists to test resume.
    Returns a summary: steps, start_step, train_loss, val_loss, tokens_per_sec, mfu, params, seconds.
    """
    with Trainer(config, workdir, objective) as trainer:
        if trainer.current_step >= trainer.total_steps:
            logging.info("already at step %d of %d: nothing to train", trainer.current_step, trainer.total_steps)
            return trainer.summary()
        batches = trainer.train_batches()
        while trainer.current_step < trainer.total_steps:
            batch = next(batches, None)
            if batch is None:
                logging.warning("the batches ended after step %d of %d", trainer.current_step, trainer.total_steps)
                trainer.save()
                break
            trainer.step(batch)
            if stop_after is not None and trainer.current_step >= stop_after:
                logging.warning("stopping after step %d as asked (stop_after), as if killed", trainer.current_step)
                break
        return trainer.summary()


def _model_kind(make_model) -> str | None:
    """lm.model.MODEL_KINDS name of the objective's model (None, with a warning, for another class)."""
    model = nnx.eval_shape(make_model)
    try:
        return lm_model.kind_of(model)
    except ValueError as e:
        logging.warning("%s: checkpoints of this run record no model_kind (load_model will not rebuild it)", e)
        return None


def _check_batch_splits(train_config, mesh) -> None:
    """Each micro batch is split over the data x fsdp devices: its rows must divide evenly."""
    accum = int(train_config.get("grad_accum", 1))
    rows, shards = train_config.batch_size // accum, mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise lm_config.ConfigError(
            f"config.train.batch_size={train_config.batch_size} / config.train.grad_accum={accum} = {rows} rows per "
            f"micro batch, which do not split over the {shards} data x fsdp devices of mesh {dict(mesh.shape)}")


def _report_config_changes(saved: dict | None, config, step: int, where: str) -> None:
    """Logs how this config differs from the checkpoint's, and, when the learning-rate schedule changed (e.g. a
    larger train.steps moves the decay horizon), the lr the next step gets under each."""
    if not saved:
        return
    changed = lm_checkpoint.config_differences(saved, config.to_dict())
    if changed:
        logging.warning("resuming %s with a config that differs from the checkpoint's: %s", where, ", ".join(changed))
    try:
        old = float(optim.learning_rate(ml_collections.ConfigDict(saved["train"]))(step))
    except (KeyError, TypeError, ValueError, AttributeError):  # a saved config too old or odd to rebuild from
        return
    new = float(optim.learning_rate(config.train)(step))
    if not np.isclose(old, new, rtol=1e-6, atol=0):
        horizon = optim.schedule_horizon(ml_collections.ConfigDict(saved["train"]))
        logging.warning(
            "the learning-rate schedule changed: step %d gets lr %.6g under this config, %.6g under the checkpoint's "
            "(%s). To keep the checkpoint's schedule, set --config.train.schedule_steps=%d (the decay horizon; "
            "past it the lr stays at its floor)", step + 1, new, old, where, horizon)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _previous_records(writer) -> list[dict]:
    return lm_metrics.read_metrics(writer.path) if writer.active and writer.path.exists() else []


def _summary(records, start, n_params, flops_per_token, peak, started) -> dict:
    """Final numbers of a run (this run's records; the earlier ones when nothing was left to train)."""
    def median(key):  # the first step also warms up
        rates = [r[key] for r in records[1:] if key in r]
        return float(np.median(rates)) if rates else 0.0

    rate = median("tokens_per_sec")
    processed = median("all_tokens_per_sec") or rate  # records of runs before all_tokens_per_sec existed
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return dict(start_step=start, steps=records[-1]["step"] if records else start, params=int(n_params),
                train_loss=records[-1]["loss"] if records else None, val_loss=val[-1] if val else None,
                tokens_per_sec=rate, all_tokens_per_sec=processed, mfu=processed * flops_per_token / peak,
                flops_per_token=flops_per_token, seconds=time.perf_counter() - started)

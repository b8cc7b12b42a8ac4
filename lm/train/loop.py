"""The one training loop. An `Objective` supplies the model, a loss, a batch source and eval batches;
the loop owns the mesh, the sharded state, the compiled step, checkpoints, metrics and resume.

Reads top to bottom: mesh -> optimizer -> state (restored or fresh) -> compiled step -> loop.
"""
import contextlib
import dataclasses
import itertools
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import mesh as lm_mesh
from lm.train import metrics as lm_metrics
from lm.train import optim
from lm.train import state as lm_state

Batch = dict  # name -> numpy array [rows of this process, ...]


@dataclasses.dataclass
class Objective:
    """What a trainer supplies.

    loss(model, batch) -> (loss_sum, weight, metric_sums): summed over the batch (weight: e.g. the number of
        scored tokens); the loop reports loss_sum / weight and each metric_sum / weight. Sums, not means, make
        gradient accumulation exactly the large batch.
    train_batches(start_step) -> iterator of this process's rows of the batches for steps start_step, ...
    eval_batches() -> iterable of this process's rows of the eval batches (or None: no eval).
    make_model() -> a fresh nnx model (with its rngs); called under the mesh, also abstractly.
    flops_per_token: model FLOPs per trained token (forward + backward), for MFU.
    meta: JSON-able facts saved with every checkpoint (tokenizer hash, data seed, ...).
    """
    loss: Callable[[Any, Batch], tuple]
    train_batches: Callable[[int], Iterator[Batch]]
    make_model: Callable[[], Any]
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    flops_per_token: float = 0.0
    meta: dict = dataclasses.field(default_factory=dict)


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
    """state, batch -> state, metrics: one optimizer update on the (accumulated) mean loss."""
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
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(objective: Objective, spec: lm_state.StateSpec):
    """params, batch -> (loss_sum, weight)."""
    def eval_step(params, batch):
        loss_sum, weight, _ = objective.loss(spec.merge(params), batch)
        return loss_sum, weight
    return eval_step


def global_batch(local: Batch, mesh) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    return {name: lm_mesh.global_array(np.asarray(value), mesh, value.shape[0] * jax.process_count())
            for name, value in local.items()}


def abstract_batch(batch: dict) -> dict:
    """ShapeDtypeStructs (with shardings) of a global batch, for lowering."""
    return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in batch.items()}


def compile_train_step(train_step, spec: lm_state.StateSpec, batch_shapes: dict, mesh):
    """jax.jit with explicit shardings and the state donated, lowered and compiled once; logs memory and FLOPs."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: x.sharding for name, x in batch_shapes.items()}
    jitted = jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings),
                     out_shardings=(spec.shardings, replicated), donate_argnums=0)
    compiled = jitted.lower(spec.abstract, batch_shapes).compile()
    log_compiled(compiled, "train step")
    return compiled


def fresh_state_and_step(objective: Objective, train_config, mesh, example_batch: dict):
    """A freshly initialised sharded state and the train step compiled for global batches like `example_batch`
    (benchmarks and tools that need a step without the loop's checkpoints and data)."""
    tx = optim.make_optimizer(train_config)
    spec = lm_state.build_spec(objective.make_model, tx, mesh)
    state = lm_state.init_state(objective.make_model, tx, spec)
    train_step = make_train_step(objective, spec, tx, optim.learning_rate(train_config),
                                 int(train_config.get("grad_accum", 1)), mesh)
    return state, compile_train_step(train_step, spec, abstract_batch(example_batch), mesh)


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


# --- The loop ------------------------------------------------------------------------------------------------------

def evaluate(eval_step, params, batches: Iterable[Batch], mesh) -> float:
    """Token-weighted mean loss over `batches` (nan if there are none)."""
    total, weight = 0.0, 0.0
    for local in batches:
        loss_sum, w = jax.device_get(eval_step(params, global_batch(local, mesh)))
        total, weight = total + float(loss_sum), weight + float(w)
    return total / weight if weight else math.nan


def train(config, workdir, objective: Objective, stop_after: int | None = None) -> dict:
    """Trains to `config.train.steps` total steps, resuming from the latest checkpoint in `workdir`.

    Metrics go to <workdir>/metrics.jsonl and tb/ every step, val loss every `eval_every` steps and at the end
    (eval_every 0: never), checkpoints every `checkpoint_every` steps and at the end. `stop_after` ends the run
    after that step as a kill would (no final checkpoint or eval): it exists to test resume.
    Returns a summary: steps, start_step, train_loss, val_loss, tokens_per_sec, mfu, params, seconds.
    """
    train_config, workdir = config.train, pathlib.Path(workdir)
    total_steps = int(train_config.steps)
    started = time.perf_counter()
    peak = lm_metrics.peak_flops()  # before the mesh is set: on CPU it times a matmul on one device

    # --- mesh ---
    mesh = lm_mesh.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    _check_batch_splits(train_config, mesh)
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(mesh))

        # --- optimizer, state shapes and shardings ---
        tx = optim.make_optimizer(train_config)
        schedule = optim.learning_rate(train_config)
        spec = lm_state.build_spec(objective.make_model, tx, mesh)
        n_params = sum(x.size for x in jax.tree.leaves(spec.abstract["params"]))
        logging.info("parameters: %s", f"{n_params:,}")

        # --- state: the latest checkpoint (onto this mesh), else a fresh sharded init ---
        checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(workdir),
                                                keep=train_config.get("keep_checkpoints", 3))
        stack.callback(checkpoints.close)
        start = checkpoints.latest_step() or 0
        if start:
            state, _ = checkpoints.restore(start, spec.abstract)
            logging.info("resumed from %s at step %d", checkpoints.directory, start)
        else:
            state = lm_state.init_state(objective.make_model, tx, spec)
        writer = lm_metrics.MetricsWriter(workdir, resume_step=start)
        stack.callback(writer.close)
        meta = dict(objective.meta, config=config.to_dict())
        if start >= total_steps:
            logging.info("already at step %d of %d: nothing to train", start, total_steps)
            return _summary(_previous_records(writer), start, n_params, objective.flops_per_token, peak, started)

        # --- data (from the restored step) and the compiled steps ---
        local_batches = objective.train_batches(start)
        first = next(local_batches)
        local_batches = itertools.chain([first], local_batches)
        train_step = make_train_step(objective, spec, tx, schedule, int(train_config.get("grad_accum", 1)), mesh)
        compiled = compile_train_step(train_step, spec, abstract_batch(global_batch(first, mesh)), mesh)
        eval_step = jax.jit(make_eval_step(objective, spec))
        tokens_per_step = first["inputs"].size * jax.process_count() if "inputs" in first else 0
        logging.info("model FLOPs per step: %.3e (%d tokens x %.3e FLOPs/token)",
                     tokens_per_step * objective.flops_per_token, tokens_per_step, objective.flops_per_token)

        # --- loop ---
        eval_every = int(train_config.get("eval_every", 0))
        checkpoint_every = int(train_config.get("checkpoint_every", 0))
        log_every = max(int(train_config.get("log_every", 1)), 1)
        records = []
        for step in range(start + 1, total_steps + 1):
            tick = time.perf_counter()
            state, step_metrics = compiled(state, global_batch(next(local_batches), mesh))
            record = {name: float(value) for name, value in jax.device_get(step_metrics).items()}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {step}: stopping ({workdir})")
            record["tokens_per_sec"] = tokens_per_step / (time.perf_counter() - tick)
            record["mfu"] = record["tokens_per_sec"] * objective.flops_per_token / peak
            if objective.eval_batches is not None and eval_every > 0 and _due(step, eval_every, total_steps):
                record["val_loss"] = evaluate(eval_step, state["params"], objective.eval_batches(), mesh)
            writer.write(step, record)
            records.append(dict(record, step=step))
            if step % log_every == 0 or step in (start + 1, total_steps):
                logging.info("step %d/%d: %s", step, total_steps, ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
            if stop_after is not None and step >= stop_after:
                logging.warning("stopping after step %d as asked (stop_after), as if killed", step)
                break
            if _due(step, checkpoint_every, total_steps):
                checkpoints.save(step, state, meta)
    return _summary(records, start, n_params, objective.flops_per_token, peak, started)


def _check_batch_splits(train_config, mesh) -> None:
    """Each micro batch is split over the data x fsdp devices: its rows must divide evenly."""
    accum = int(train_config.get("grad_accum", 1))
    rows, shards = train_config.batch_size // accum, mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise lm_config.ConfigError(
            f"config.train.batch_size={train_config.batch_size} / config.train.grad_accum={accum} = {rows} rows per "
            f"micro batch, which do not split over the {shards} data x fsdp devices of mesh {dict(mesh.shape)}")


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _previous_records(writer) -> list[dict]:
    return lm_metrics.read_metrics(writer.path) if writer.active and writer.path.exists() else []


def _summary(records, start, n_params, flops_per_token, peak, started) -> dict:
    """Final numbers of a run (this run's records; the earlier ones when nothing was left to train)."""
    rates = [r["tokens_per_sec"] for r in records[1:] if "tokens_per_sec" in r]  # the first step also warms up
    rate = float(np.median(rates)) if rates else 0.0
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return dict(start_step=start, steps=records[-1]["step"] if records else start, params=int(n_params),
                train_loss=records[-1]["loss"] if records else None, val_loss=val[-1] if val else None,
                tokens_per_sec=rate, mfu=rate * flops_per_token / peak, flops_per_token=flops_per_token,
                seconds=time.perf_counter() - started)

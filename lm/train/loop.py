"""The one training loop. An `Objective` supplies the model, a loss, a batch source and eval batches;
the loop owns the mesh, the sharded state, the compiled step, checkpoints, metrics and resume.

Reads top to bottom: mesh -> optimizer -> state (restored or fresh) -> compiled step -> loop.
"""
import dataclasses
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

def _loss_sum_and_grad(objective: Objective, spec: lm_state.StateSpec):
    def loss_of_params(params, batch):
        loss_sum, weight, sums = objective.loss(spec.merge(params), batch)
        return loss_sum, (weight, sums)

    def loss_sum_and_grad(params, batch):
        (loss_sum, (weight, sums)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params, batch)
        return (loss_sum, weight, sums), grads

    return loss_sum_and_grad


def make_train_step(objective: Objective, spec: lm_state.StateSpec, tx, schedule, grad_accum: int, mesh):
    """state, batch -> state, metrics: one optimizer update on the (accumulated) mean loss."""
    loss_sum_and_grad = _loss_sum_and_grad(objective, spec)

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


def _global_batch(local: Batch, mesh) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    return {name: lm_mesh.global_array(np.asarray(value), mesh, value.shape[0] * jax.process_count())
            for name, value in local.items()}


def _abstract_batch(global_batch: dict) -> dict:
    return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in global_batch.items()}


def compile_train_step(train_step, spec: lm_state.StateSpec, abstract_batch: dict, mesh):
    """jax.jit with explicit shardings and the state donated, lowered and compiled once; logs memory and FLOPs."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {name: x.sharding for name, x in abstract_batch.items()}
    jitted = jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings),
                     out_shardings=(spec.shardings, replicated), donate_argnums=0)
    compiled = jitted.lower(spec.abstract, abstract_batch).compile()
    log_compiled(compiled, "train step")
    return compiled


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
        loss_sum, w = jax.device_get(eval_step(params, _global_batch(local, mesh)))
        total, weight = total + float(loss_sum), weight + float(w)
    return total / weight if weight else math.nan


def train(config, workdir, objective: Objective, stop_after: int | None = None) -> dict:
    """Trains to `config.train.steps` total steps, resuming from the latest checkpoint in `workdir`.

    `stop_after` ends the run after that step as a kill would (no final checkpoint or eval): used to test resume.
    Returns a summary: steps, first step of this run, final train / val loss, tokens/s, MFU, parameter count.
    """
    train_config = config.train
    workdir = pathlib.Path(workdir)
    started = time.perf_counter()

    peak = lm_metrics.peak_flops()  # measured before the mesh is set: the CPU probe runs on one device

    # --- mesh ---
    mesh = lm_mesh.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    with jax.set_mesh(mesh):
        # --- optimizer and state shapes ---
        tx = optim.make_optimizer(train_config)
        schedule = optim.learning_rate(train_config)
        spec = lm_state.build_spec(objective.make_model, tx, mesh)
        n_params = sum(x.size for x in jax.tree.leaves(spec.abstract["params"]))
        logging.info("parameters: %s", f"{n_params:,}")

        # --- state: restored from the latest checkpoint, else fresh ---
        checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(workdir),
                                                keep=train_config.get("keep_checkpoints", 3))
        start = checkpoints.latest_step() or 0
        if start:
            state, _ = checkpoints.restore(start, spec.abstract)
            logging.info("resumed from %s at step %d", checkpoints.directory, start)
        else:
            state = lm_state.init_state(objective.make_model, tx, spec)
        total_steps = int(train_config.steps)
        writer = lm_metrics.MetricsWriter(workdir, resume_step=start)
        meta = dict(objective.meta, config=config.to_dict())
        summary = dict(start_step=start, steps=start, params=int(n_params))
        try:
            if start < total_steps:
                summary.update(_run_steps(config, workdir, objective, mesh, spec, tx, schedule, state, start,
                                          checkpoints, writer, meta, peak, stop_after))
            else:
                logging.info("already at step %d of %d: nothing to train", start, total_steps)
        finally:
            writer.close()
            checkpoints.close()
    summary["seconds"] = time.perf_counter() - started
    return summary


def _run_steps(config, workdir, objective, mesh, spec, tx, schedule, state, start, checkpoints, writer, meta, peak,
               stop_after):
    train_config = config.train
    total_steps = int(train_config.steps)
    batches = objective.train_batches(start)
    batch = _global_batch(next(batches), mesh)
    tokens_per_step = int(batch["inputs"].size) if "inputs" in batch else 0

    # --- compiled steps ---
    train_step = make_train_step(objective, spec, tx, schedule, int(train_config.get("grad_accum", 1)), mesh)
    compiled = compile_train_step(train_step, spec, _abstract_batch(batch), mesh)
    eval_step = jax.jit(make_eval_step(objective, spec))
    logging.info("model FLOPs per step: %.3e (%d tokens x %.3e FLOPs/token)",
                 tokens_per_step * objective.flops_per_token, tokens_per_step, objective.flops_per_token)

    # --- loop ---
    eval_every = int(train_config.get("eval_every", 0))
    checkpoint_every = int(train_config.get("checkpoint_every", 0))
    log_every = max(int(train_config.get("log_every", 1)), 1)
    last = {}
    rates = []
    step = start
    tick = time.perf_counter()
    while True:
        state, step_metrics = compiled(state, batch)
        record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        step += 1
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {step}: stopping ({workdir})")
        seconds = time.perf_counter() - tick
        record["tokens_per_sec"] = tokens_per_step / seconds
        record["mfu"] = record["tokens_per_sec"] * objective.flops_per_token / peak
        if step > start + 1:  # the first step also pays for warming up
            rates.append(record["tokens_per_sec"])
        if objective.eval_batches is not None and eval_every > 0 and (step % eval_every == 0 or step == total_steps):
            record["val_loss"] = evaluate(eval_step, state["params"], objective.eval_batches(), mesh)
        writer.write(step, record)
        last.update(record)
        if step % log_every == 0 or step == total_steps or step == start + 1:
            logging.info("step %d/%d: %s", step, total_steps,
                         ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
        if stop_after is not None and step >= stop_after:
            logging.warning("stopping after step %d as asked (stop_after)", step)
            break
        if step == total_steps or checkpoint_every and step % checkpoint_every == 0:
            checkpoints.save(step, state, meta)
        if step == total_steps:
            break
        tick = time.perf_counter()
        batch = _global_batch(next(batches), mesh)

    rate = float(np.median(rates)) if rates else last.get("tokens_per_sec", 0.0)
    return dict(steps=step, train_loss=last.get("loss"), val_loss=last.get("val_loss"), tokens_per_sec=rate,
                mfu=rate * objective.flops_per_token / peak, flops_per_token=objective.flops_per_token)

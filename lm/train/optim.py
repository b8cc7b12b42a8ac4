"""AdamW with warmup + decay, a weight-decay mask, global-norm clipping, and gradient accumulation."""
import math

import jax
import jax.numpy as jnp
import optax

from lm import config as lm_config


def schedule_horizon(train) -> int:
    """The step at which the decay reaches its floor: `train.schedule_steps`, or `train.steps` when that is 0 or
    absent. Fixing it keeps the schedule of a run that is later continued to more steps (after the horizon the lr
    stays at the floor); leaving it at 0 stretches the decay over the new total."""
    horizon = int(train.get("schedule_steps", 0) or 0)
    if horizon < 0:
        raise lm_config.ConfigError(f"config.train.schedule_steps={horizon}: must be >= 0 (0: train.steps)")
    return horizon or int(train.steps)


def learning_rate(train):
    """Linear warmup to `train.lr`, then cosine / linear decay to `lr * min_lr_ratio` at `schedule_horizon(train)`
    (train.schedule_steps, default train.steps), or constant."""
    peak = float(train.lr)
    floor = peak * float(train.get("min_lr_ratio", 0.1))
    warmup = int(train.warmup_steps)
    decay_steps = max(schedule_horizon(train) - warmup, 1)
    kind = train.get("schedule", "cosine")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(math.pi * t))
        elif kind == "linear":
            decayed = peak + (floor - peak) * t
        else:
            decayed = jnp.full_like(t, peak)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def _path_names(path):
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def is_embedding(path) -> bool:
    """A parameter whose path names an embedding table (token or position embeddings)."""
    return any("embed" in name or name in ("wte", "wpe") for name in _path_names(path))


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: weight matrices, never norms or biases; embeddings only if asked."""
    def decays(path, leaf):
        if leaf.ndim < 2 or any("bias" in name or "norm" in name for name in _path_names(path)):
            return False
        return decay_embeddings or not is_embedding(path)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on `learning_rate(train)` with `decay_mask`."""
    decay_embeddings = bool(train.get("decay_embeddings", False))
    adamw = optax.adamw(learning_rate(train), b1=train.b1, b2=train.b2, eps=train.eps,
                        weight_decay=train.weight_decay, mask=lambda p: decay_mask(p, decay_embeddings))
    clip = train.get("grad_clip", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip and clip > 0 else adamw


def accumulate_gradients(loss_sum_and_grad, params, batch, n_micro: int, micro_sharding=None):
    """Sums `(loss_sum, weight, metrics), grads` over `n_micro` slices of the batch's leading axis.

    `loss_sum_and_grad(params, micro_batch)` returns summed (not averaged) quantities, so the sum over micro
    batches equals the value on the whole batch and accumulation matches the large batch. Micro batch i takes
    rows i, i + n_micro, ... so every micro batch stays spread over the batch-sharded devices.
    """
    if n_micro == 1:
        return loss_sum_and_grad(params, batch)

    def split(x):
        x = x.reshape((x.shape[0] // n_micro, n_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    micro_batches = jax.tree.map(split, batch)

    def body(carry, micro):
        if micro_sharding is not None:
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, micro_sharding(x.ndim)), micro)
        out = loss_sum_and_grad(params, micro)
        return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(loss_sum_and_grad, params, first))
    total, _ = jax.lax.scan(body, zeros, micro_batches)
    return total

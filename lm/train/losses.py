"""Losses shared by the objectives, on the one log-prob path (`lm.model.token_logprobs`).

An Objective's loss returns sums, not means: `(loss_sum, weight, metric_sums)`; the loop divides by the summed
weight (so gradient accumulation is exactly the large batch).

Chunked cross-entropy (`config.train.loss_chunk`, 0 = off): the LM head and the log-softmax run `chunk` positions at
a time in a `lax.scan`, each chunk under `jax.checkpoint`, so neither the forward nor the backward pass ever holds the
float32 [batch, length, vocab] logits; only [batch, chunk, vocab] at a time. The backward pass recomputes each
chunk's logits (one more head matmul per token). Worth it when vocab x length is large (e.g. 50k x 1024 x batch 32
= 6.6 GB of float32 logits, plus as much again for their gradient).

Fused cross-entropy (`config.train.fused_loss`): the pretraining / SFT loss through `lm.model.head_nll_sum`, which
forms the head's and the hidden states' gradients chunk by chunk in the forward pass (`loss_chunk` positions at a
time, 128 when 0) with no recomputation and no float32 logits in memory. For `lm_loss` only (a masked sum); the
log-probs themselves (scoring, RL) stay on `token_logprobs_from_hidden`.

Fused per-token losses (`head_token_loss`, GRPO's loss): the same idea for any loss that is a sum of per-token terms
of the log-probs (a policy-gradient term times its aggregation weight): the head, one log-softmax and the gradient
chunk by chunk, with the log-probs and the entropy returned as metrics.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ConfigError
from lm.model import head_nll_sum, reductions, token_logprobs

FUSED_CHUNK = 128  # positions per chunk of the fused cross-entropy when loss_chunk is 0


def token_logprobs_from_hidden(model, hidden, targets, chunk: int = 0):
    """log p(targets) through `model.logits`: hidden [B, T, d], targets int [B, T] -> float32 [B, T].

    chunk > 0 computes `chunk` positions at a time (see the module doc); equal to the plain path to float tolerance.
    """
    T = hidden.shape[1]
    if not chunk or chunk >= T:
        return token_logprobs(model.logits(hidden), targets)
    B, d = hidden.shape[0], hidden.shape[2]
    n = -(-T // chunk)
    pad = n * chunk - T  # the padded tail is scored and dropped
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(B, n, chunk, d).swapaxes(0, 1)  # [n, B, chunk, d]: rows keep their sharding
    target_chunks = targets.reshape(B, n, chunk).swapaxes(0, 1)
    graphdef, state = nnx.split(model)

    @jax.checkpoint  # save only the chunk's inputs; the backward pass recomputes its logits
    def chunk_logprobs(state, h, t):
        return token_logprobs(nnx.merge(graphdef, state).logits(h), t)

    def body(_, xs):
        return None, chunk_logprobs(state, *xs)

    _, logprobs = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    return logprobs.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def sequence_token_logprobs(model, inputs, targets, positions=None, chunk: int = 0):
    """log p(targets[b, t] | inputs[b, :t+1]) for every position: int [B, T] -> float32 [B, T] (SFT, DPO, RL)."""
    return token_logprobs_from_hidden(model, model.hidden(inputs, positions), targets, chunk)


def lm_loss(model, batch, chunk: int = 0, fused: bool = False):
    """(summed next-token negative log-likelihood over loss_mask, number of scored tokens, {}) of a batch of
    inputs / targets / loss_mask [B, T]: the pretraining and SFT loss. fused: through `head_nll_sum`."""
    if fused:
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = head_nll_sum(model.hidden(batch["inputs"]), model.head_weight(), batch["targets"], mask,
                           chunk or FUSED_CHUNK)
        return nll, jnp.sum(mask), {}
    logprobs = sequence_token_logprobs(model, batch["inputs"], batch["targets"], chunk=chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(logprobs * mask), jnp.sum(mask), {}


def make_lm_loss(train_config):
    """`lm_loss` with `config.train.loss_chunk` (0 or absent: the plain path) and `config.train.fused_loss`."""
    chunk = int(train_config.get("loss_chunk", 0) or 0)
    if chunk < 0:
        raise ConfigError(f"config.train.loss_chunk={chunk}: must be 0 (off) or a positive number of positions")
    if train_config.get("fused_loss", False):
        return functools.partial(lm_loss, chunk=chunk, fused=True)
    return functools.partial(lm_loss, chunk=chunk) if chunk else lm_loss


def head_token_loss(model, hidden, targets, token_loss, data, chunk: int = 0):
    """(sum of token_loss(logp, *data), logp, entropy) through the LM head, without the [rows, vocab] arrays.

    hidden [B, T, d] (from `model.hidden`), targets int [B, T]; token_loss(logp, *data) -> float32 [..., T]:
    each token's (weighted) share of a loss, elementwise in the tokens (token t's value depends on logp[..., t]
    and data[..., t] only), e.g. a policy-gradient term times its aggregation weight; data: arrays [B, T] or [B]
    (treated as constants). Returns the summed loss (differentiable in the model), and logp (= token_logprobs)
    and the per-token entropy, both float32 [B, T] and without gradient (for metrics).

    The head and one log-softmax run `chunk` positions (B * chunk rows) at a time (0: all at once) under a
    `jax.custom_vjp`: as the loss is a sum of per-token terms, each token's dloss/dlogp is known as soon as its
    logp is, so the forward pass forms dlogits = dloss/dlogp * (onehot - softmax) chunk by chunk from the chunk's
    softmax while it is in cache, and with it dhidden and dweight (as lm.model.head_nll_sum does for the
    cross-entropy). One exponential per logit serves logp, the entropy and the gradient; no [B, T, vocab] array
    is kept for the backward pass, which only scales dhidden and dweight by the incoming cotangent.
    """
    T = hidden.shape[1]
    chunk = T if not chunk or chunk >= T else chunk
    data = tuple(jnp.broadcast_to(x[:, None] if x.ndim == 1 else x, targets.shape).astype(jnp.float32)
                 for x in data)
    total, logp, entropy = _head_token_loss(token_loss, chunk, hidden, model.head_weight(), targets, data)
    return total, jax.lax.stop_gradient(logp), jax.lax.stop_gradient(entropy)


def _head_chunks(chunk, hidden, targets, data):
    """Positions split into [n, B, chunk, ...] (the padded tail: target 0, data 0, scored and dropped)."""
    B, T, d = hidden.shape
    n = -(-T // chunk)
    pad = ((0, 0), (0, n * chunk - T))

    def split(x):
        x = jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2))
        return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)
    return split(hidden), split(targets.astype(jnp.int32)), tuple(split(x) for x in data)


def _head_chunk(token_loss, h, weight, t, data, grad: bool):
    """One chunk [B, c, ...]: (loss sum, logp, entropy[, dhidden, dweight])."""
    B, c, d = h.shape
    flat = h.reshape(-1, d)
    logits = jnp.einsum("nd,vd->nv", flat, weight, preferred_element_type=jnp.float32)
    shifted = logits - jax.lax.stop_gradient(reductions.row_max(logits))[:, None]
    exp = jnp.exp(shifted)
    total_exp = reductions.row_sum(exp)[:, None]
    log_total = jnp.log(total_exp)
    is_target = jnp.arange(logits.shape[-1])[None, :] == t.reshape(-1, 1)
    logp = jnp.take_along_axis(shifted, t.reshape(-1, 1), axis=-1) - log_total
    entropy = log_total - reductions.row_sum(exp * shifted)[:, None] / total_exp
    logp, entropy = logp.reshape(B, c), entropy.reshape(B, c)
    if not grad:
        return jnp.sum(token_loss(logp, *data)), logp, entropy
    losses, pullback = jax.vjp(lambda lp: token_loss(lp, *data), logp)
    dlogp = pullback(jnp.ones_like(losses))[0].reshape(-1, 1)
    dlogits = (dlogp * (is_target - exp / total_exp)).astype(weight.dtype)
    dh = jnp.einsum("nv,vd->nd", dlogits, weight, preferred_element_type=jnp.float32)
    dweight = jnp.einsum("nv,nd->vd", dlogits, flat, preferred_element_type=jnp.float32)
    return jnp.sum(losses), logp, entropy, dh.reshape(h.shape).astype(h.dtype), dweight


def _head_scan(token_loss, chunk, hidden, weight, targets, data, grad: bool):
    B, T, d = hidden.shape
    xs = _head_chunks(chunk, hidden, targets, data)

    def body(carry, x):
        out = _head_chunk(token_loss, x[0], weight, x[1], x[2], grad)
        total = carry[0] + out[0]
        if not grad:
            return (total,), out[1:]
        return (total, carry[1] + out[4]), out[1:4]

    init = (jnp.zeros((), jnp.float32),) + ((jnp.zeros(weight.shape, jnp.float32),) if grad else ())
    if xs[0].shape[0] == 1:  # one chunk: no scan
        carry, ys = body(init, jax.tree.map(lambda x: x[0], xs))
        ys = jax.tree.map(lambda y: y[None], ys)
    else:
        carry, ys = jax.lax.scan(body, init, xs)
    ys = tuple(y.swapaxes(0, 1).reshape(B, -1, *y.shape[3:])[:, :T] for y in ys)
    return carry, ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _head_token_loss(token_loss, chunk, hidden, weight, targets, data):
    (total,), (logp, entropy) = _head_scan(token_loss, chunk, hidden, weight, targets, data, grad=False)
    return total, logp, entropy


def _head_token_loss_fwd(token_loss, chunk, hidden, weight, targets, data):
    (total, dweight), (logp, entropy, dhidden) = _head_scan(token_loss, chunk, hidden, weight, targets, data,
                                                             grad=True)
    return (total, logp, entropy), (dhidden, dweight.astype(weight.dtype), targets, data)


def _head_token_loss_bwd(token_loss, chunk, residuals, cotangents):
    # logp and entropy leave head_token_loss through stop_gradient: only the loss's cotangent is ever non-zero
    dhidden, dweight, targets, data = residuals
    cotangent = cotangents[0]
    return ((cotangent * dhidden).astype(dhidden.dtype), (cotangent * dweight).astype(dweight.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), tuple(jnp.zeros_like(x) for x in data))


_head_token_loss.defvjp(_head_token_loss_fwd, _head_token_loss_bwd)

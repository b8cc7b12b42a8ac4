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
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError
from lm.model import head_nll_sum, token_logprobs

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

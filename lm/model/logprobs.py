"""The one log-probability path: pretraining loss, scoring, the decoder's returned log-probs and RL losses all
use `token_logprobs`, so the numbers a sampler reports are the numbers a trainer differentiates."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import reductions


def token_logprobs(logits, targets):
    """log p(targets) under `logits`: [..., V] and int [...] -> float32 [...], computed stably in float32.

    logsumexp is taken in float32 whatever the logits' dtype (bf16 logits lose ~1e-2 nats otherwise).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - reductions.logsumexp(logits)


def head_nll_sum(hidden, weight, targets, mask, chunk: int = 128):
    """sum(-log p(targets) * mask) through an LM head, without ever holding the [rows, vocab] logits.

    hidden [B, T, d] and weight [V, d] (logits = hidden @ weight.T, float32 accumulation; both in the compute
    dtype), targets int [B, T], mask [B, T] (any float: each row's weight) -> float32 scalar. Runs `chunk` positions
    (B * chunk rows) at a time. Differentiable in hidden and weight (`jax.custom_vjp`): because the loss is one
    scalar and the mask is known, the forward pass of a gradient computation forms the gradients too, chunk by chunk,
    from the chunk's softmax while it is in cache: dlogits = mask * (softmax - onehot), dh = dlogits @ W,
    dW += dlogits^T h. The same three matmuls per token as the plain path, no recomputation, and no float32
    [rows, vocab] array (logits, probabilities or their gradient) is ever written out; the backward pass only
    scales the stored dh and dW by the incoming cotangent. Without differentiation it is the forward part only.
    """
    return _head_nll_sum(chunk, hidden, weight, targets, mask.astype(jnp.float32))


def _chunks(chunk, hidden, targets, mask):
    """Positions split into [n, B, chunk, ...] (padded with mask 0; rows keep their batch sharding)."""
    B, T, d = hidden.shape
    n = -(-T // chunk)
    pad = ((0, 0), (0, n * chunk - T))
    hidden = jnp.pad(hidden, pad + ((0, 0),)).reshape(B, n, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets.astype(jnp.int32), pad).reshape(B, n, chunk).swapaxes(0, 1)
    mask = jnp.pad(mask.astype(jnp.float32), pad).reshape(B, n, chunk).swapaxes(0, 1)
    return hidden, targets, mask


def _chunk_logits(h, weight):
    """[B, c, d] x [V, d] -> float32 [B * c, V] (one 2-D matmul; see Transformer.logits)."""
    return jnp.einsum("nd,vd->nv", h.reshape(-1, h.shape[-1]), weight, preferred_element_type=jnp.float32)


def _chunk_nll(logits, t, m):
    picked = jnp.take_along_axis(logits, t.reshape(-1, 1), axis=-1)[:, 0]
    return jnp.sum((reductions.logsumexp(logits) - picked) * m.reshape(-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_nll_sum(chunk, hidden, weight, targets, mask):
    def body(total, xs):
        h, t, m = xs
        return total + _chunk_nll(_chunk_logits(h, weight), t, m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _chunks(chunk, hidden, targets, mask))
    return total


def _head_nll_sum_fwd(chunk, hidden, weight, targets, mask):
    B, T, d = hidden.shape

    def body(carry, xs):
        total, dweight = carry
        h, t, m = xs
        logits = _chunk_logits(h, weight)
        lse = reductions.logsumexp(logits)[:, None]
        is_target = jnp.arange(logits.shape[-1])[None, :] == t.reshape(-1, 1)
        picked = jnp.take_along_axis(logits, t.reshape(-1, 1), axis=-1)[:, 0]
        rows_mask = m.reshape(-1, 1)
        dlogits = ((jnp.exp(logits - lse) - is_target) * rows_mask).astype(weight.dtype)
        dh = jnp.einsum("nv,vd->nd", dlogits, weight, preferred_element_type=jnp.float32)
        dweight = dweight + jnp.einsum("nv,nd->vd", dlogits, h.reshape(-1, d), preferred_element_type=jnp.float32)
        total = total + jnp.sum((lse[:, 0] - picked) * rows_mask[:, 0])
        return (total, dweight), dh.reshape(h.shape).astype(hidden.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(weight.shape, jnp.float32))
    (total, dweight), dhidden = jax.lax.scan(body, init, _chunks(chunk, hidden, targets, mask))
    dhidden = dhidden.swapaxes(0, 1).reshape(B, -1, d)[:, :T]
    return total, (dhidden, dweight.astype(weight.dtype), targets, mask)


def _head_nll_sum_bwd(chunk, residuals, cotangent):
    dhidden, dweight, targets, mask = residuals
    # targets are integers (float0 cotangent); the mask is treated as a constant (its gradient is not formed)
    return ((cotangent * dhidden).astype(dhidden.dtype), (cotangent * dweight).astype(dweight.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(mask))


_head_nll_sum.defvjp(_head_nll_sum_fwd, _head_nll_sum_bwd)

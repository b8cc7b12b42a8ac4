"""The one log-probability path: pretraining loss, scoring, the decoder's returned log-probs and RL losses all
use `token_logprobs`, so the numbers a sampler reports are the numbers a trainer differentiates."""
import jax
import jax.numpy as jnp


def token_logprobs(logits, targets):
    """log p(targets) under `logits`: [..., V] and int [...] -> float32 [...], computed stably in float32.

    logsumexp is taken in float32 whatever the logits' dtype (bf16 logits lose ~1e-2 nats otherwise).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

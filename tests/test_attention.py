"""The attention paths and compute levers (config.model.attention / attention_block / fused_qkv / flat_matmuls) equal
the reference: values and gradients, with padding masks, grouped-query heads and a KV cache.

The reference is a plain numpy masked softmax (for values) and the "xla" einsum path (for gradients, itself checked
against numpy here). Rows whose query may attend to nothing (padding queries) are undefined in every implementation
and left out of the comparison.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.model import Transformer, from_params
from lm.model.layers import attention

RTOL = ATOL = 2e-5


def numpy_attention(q, k, v, mask):
    """q [B, T, H, D], k, v [B, S, K, D], mask [B, T, S]: each kv head repeated over its query heads."""
    H, K = q.shape[2], k.shape[2]
    kr, vr = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kr) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):  # a padding query sees no key: NaN there, never compared
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, vr).astype(np.float32)


def random_qkv(B, T, H, K, D, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s, dtype=np.float32) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))


def padded_causal_mask(B, T, seed=0):
    """Causal & left padding of a random length per row (row 0 unpadded): positions like [-1, -1, 0, 1, ...]."""
    pads = np.random.default_rng(seed).integers(0, T // 2, B)
    pads[0] = 0
    valid = np.arange(T)[None, :] >= pads[:, None]
    causal = np.tril(np.ones((T, T), bool))[None]
    return causal & valid[:, None, :], valid


@functools.partial(jax.jit, static_argnames=("implementation", "block", "with_mask"))
def _value_and_grads(q, k, v, mask, weights, implementation, block, with_mask):
    def loss(q, k, v):
        out = attention(q, k, v, mask if with_mask else None, implementation, block=block)
        return jnp.sum(out * weights), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


# (B, T, H, K, D, block): blocks that divide T; blocks that do not (a short last block) with grouped-query heads.
SHAPES = [(2, 16, 4, 4, 8, 4), (3, 13, 6, 2, 8, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "dot_product", "blockwise", "auto"])
def test_attention_values_and_gradients_equal_the_reference(shape, padded, implementation):
    B, T, H, K, D, block = shape
    q, k, v = random_qkv(B, T, H, K, D)
    mask, valid = padded_causal_mask(B, T) if padded else (np.tril(np.ones((T, T), bool))[None].repeat(B, 0),
                                                           np.ones((B, T), bool))
    # Only real queries count: padding rows see no key at all (undefined output), so they carry no loss weight.
    weights = np.random.default_rng(3).standard_normal(q.shape, dtype=np.float32) * valid[:, :, None, None]
    out, grads = _value_and_grads(q, k, v, mask, weights, implementation, block, padded)
    want = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[valid], want[valid], rtol=RTOL, atol=ATOL)
    _, want_grads = _value_and_grads(q, k, v, mask, weights, "xla", 1, True)  # (block: unused by "xla")
    for name, got, ref in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=f"d loss / d {name}")


def test_xla_gradients_match_finite_differences():
    """The gradient reference itself: the "xla" path's d/dq against central differences of numpy's attention."""
    B, T, H, K, D = 1, 5, 2, 1, 4
    q, k, v = random_qkv(B, T, H, K, D, seed=4)
    mask = np.tril(np.ones((T, T), bool))[None]
    weights = np.random.default_rng(5).standard_normal(q.shape)
    _, (dq, _, _) = _value_and_grads(q, k, v, mask, weights.astype(np.float32), "xla", 1, True)
    eps = 1e-3
    numeric = np.zeros(q.shape)
    for index in np.ndindex(q.shape):
        up, down = q.astype(np.float64), q.astype(np.float64)
        up[index] += eps
        down[index] -= eps
        f = lambda x: np.sum(numpy_attention(x, k, v, mask).astype(np.float64) * weights)  # noqa: E731
        numeric[index] = (f(up) - f(down)) / (2 * eps)
    np.testing.assert_allclose(dq, numeric, rtol=1e-2, atol=1e-3)


def test_blockwise_with_a_kv_cache_is_the_full_path():
    """With the cache's [B, K, S, D] layout (S > T: decode steps), "blockwise" reads the whole cache like "xla"."""
    B, T, S, H, K, D = 2, 3, 10, 4, 2, 8
    rng = np.random.default_rng(6)
    q = rng.standard_normal((B, T, H, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, K, S, D), dtype=np.float32) for _ in range(2))
    index = 5  # the new tokens sit in slots 5..7; slot 1 of row 1 is padding
    mask = np.arange(S)[None, None, :] <= (index + np.arange(T))[None, :, None]
    mask = np.repeat(mask, B, 0)
    mask[1, :, 1] = False
    want = numpy_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
    for implementation in ("xla", "blockwise", "dot_product"):
        got = attention(q, k, v, mask, implementation, kv_heads_first=True, block=2)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=implementation)


# --- The levers in the whole model ---------------------------------------------------------------------------------

LEVERS = [dict(attention="blockwise", attention_block=4), dict(fused_qkv=True), dict(flat_matmuls=False),
          dict(attention="blockwise", attention_block=5, fused_qkv=True, flat_matmuls=True)]


def tiny(family, **overrides):
    return dict(family=family, vocab_size=96, n_layers=2, d_model=32, n_heads=4,
                n_kv_heads=4 if family == "gpt2" else 2, d_ff=64, max_len=32, dtype="float32",
                param_dtype="float32", tie_embeddings=family == "gpt2", **overrides)


@functools.cache
def base_params(family):
    """Params with noise on every value (zero biases and unit norms take part)."""
    state = nnx.state(Transformer(tiny(family), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), state)
    return nnx.to_pure_dict(state)


@functools.partial(jax.jit, static_argnums=0)
def _model_loss_and_grads(graphdef, state, tokens, positions, weights):
    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens, positions=positions)
        return jnp.sum(logits * weights), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return logits, grads


def model_logits_and_grads(config, family, tokens, positions):
    graphdef, state = nnx.split(from_params(config, base_params(family)))
    valid = (positions >= 0)[:, :, None]
    weights = np.random.default_rng(2).standard_normal((*tokens.shape, 96)).astype(np.float32) * valid
    logits, grads = _model_loss_and_grads(graphdef, state, tokens, positions, weights)
    return np.asarray(logits), nnx.to_pure_dict(grads)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("levers", LEVERS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_levers_keep_logits_gradients_and_parameter_paths(family, levers):
    T = 13
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 96, (2, T)), jnp.int32)
    positions = np.broadcast_to(np.arange(T), (2, T)).copy()
    positions[1] -= 4  # row 1 left padded by 4: positions -4..8
    positions = jnp.asarray(positions, jnp.int32)
    want_logits, want_grads = model_logits_and_grads(tiny(family), family, tokens, positions)
    logits, grads = model_logits_and_grads(tiny(family, **levers), family, tokens, positions)
    valid = np.asarray(positions) >= 0
    np.testing.assert_allclose(logits[valid], want_logits[valid], rtol=RTOL, atol=ATOL)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)  # same parameter paths, same shapes
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want_grads)


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, tokens, cache):
    model = nnx.merge(graphdef, state)
    return (model(tokens), None) if cache is None else model(tokens, cache=cache)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_levers_keep_kv_cache_decoding(family):
    """Prefill 6 tokens through the cache, then decode one at a time: equal to the full forward of the base model."""
    T = 11
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, 96, (2, T)), jnp.int32)
    want = np.asarray(_run(*nnx.split(from_params(tiny(family), base_params(family))), tokens, None)[0])
    model = from_params(tiny(family, **LEVERS[-1]), base_params(family))
    graphdef, state = nnx.split(model)
    logits, cache = _run(graphdef, state, tokens[:, :6], model.init_cache(2, 16))
    pieces = [logits]
    for t in range(6, T):
        logits, cache = _run(graphdef, state, tokens[:, t:t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), want, rtol=RTOL, atol=ATOL)


def test_bad_lever_values_name_the_key():
    from lm.config import ConfigError
    with pytest.raises(ConfigError, match="config.model.attention='flash'.*blockwise"):
        Transformer(tiny("gpt2", attention="flash"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="config.model.attention_block=0"):
        Transformer(tiny("gpt2", attention="blockwise", attention_block=0), rngs=nnx.Rngs(0))


def test_auto_is_blockwise_from_four_blocks_on_and_xla_below():
    """"auto" (the default) traces to exactly the blockwise program at T >= 4 blocks and to the xla one below."""
    def program(implementation, T, block):
        q, k, v = random_qkv(1, T, 2, 2, 4)
        return str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, None, implementation, block=block))(q, k, v))

    assert program("auto", 16, 4) == program("blockwise", 16, 4) != program("xla", 16, 4)
    assert program("auto", 15, 4) == program("xla", 15, 4) != program("blockwise", 15, 4)
    assert Transformer(tiny("gpt2"), rngs=nnx.Rngs(0)).spec.attention == "auto"  # the default

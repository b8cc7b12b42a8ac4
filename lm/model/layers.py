"""Transformer building blocks: parameters with logical axes, norms, RoPE, attention, MLPs.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (names from lm.mesh.RULES); `lm.model.shardings`
turns those names into NamedShardings. (Not flax's `out_sharding` metadata: NNX shards such variables eagerly when
they are created, which needs a mesh and mesh-axis names, and cannot leave an indivisible dimension replicated.)
Weights are stored in `param_dtype` and cast to the compute `dtype` at use.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm import mesh as lm_mesh
from lm.model import reductions


def param(rngs, shape, axes, dtype, std) -> nnx.Param:
    """A weight drawn from N(0, std^2), its dimensions named by logical `axes`."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def constant(shape, axes, dtype, value) -> nnx.Param:
    """A parameter filled with `value` (norm gains: 1, biases: 0)."""
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=tuple(axes))


def constrain(x, logical_axes):
    """Pins an activation's sharding to its logical axes when a mesh is set (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, lm_mesh.logical_to_spec(logical_axes, x.shape, mesh))


@jax.custom_vjp
def add_bias(y, b):
    """y [..., *b.shape] + b (in y's dtype). Its gradient for b is a matmul with a vector of ones over all leading
    positions: as the plain broadcast's transpose (a reduce_sum), XLA's CPU backend fuses the whole elementwise
    backward before it (e.g. GELU's) into one column-order reduction, ~10x slower than the matmul (GRPO train step
    at the tiny shape: 6 of 55 ms in one such fusion)."""
    return y + b.astype(y.dtype)


def _add_bias_fwd(y, b):
    return add_bias(y, b), b


def _add_bias_bwd(b, g):
    return g, _sum_over_positions(g, b)


def _sum_over_positions(x, param):
    """x [..., *param.shape] summed over its leading positions as ones @ x (float32 accumulation), in param's
    shape and dtype: the gradient of a parameter broadcast over positions."""
    rows = x.reshape(-1, param.size)
    total = jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows, preferred_element_type=jnp.float32)
    return total.reshape(param.shape).astype(param.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def apply_gain(y, g):
    """y [..., *g.shape] * g (in y's dtype): a norm's gain, its gradient a matmul with ones as `add_bias`'s."""
    return y * g.astype(y.dtype)


def _gain_fwd(y, g):
    return apply_gain(y, g), (y, g)


def _gain_bwd(residuals, cotangent):
    y, g = residuals
    return cotangent * g.astype(cotangent.dtype), _sum_over_positions(cotangent * y, g)


apply_gain.defvjp(_gain_fwd, _gain_bwd)


class LayerNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = constant((dim,), ("norm",), param_dtype, 1.0)
        self.bias = constant((dim,), ("norm",), param_dtype, 0.0)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return add_bias(apply_gain(y, self.scale[...]), self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = constant((dim,), ("norm",), param_dtype, 1.0)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return apply_gain(y, self.scale[...]).astype(x.dtype)


def rope_tables(positions, head_dim, theta):
    """(sin, cos), each float32 [B, T, head_dim / 2], for integer positions [B, T]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x, rope):
    """Rotates [B, T, heads, head_dim] by the (sin, cos) tables; the half-split layout HF LLaMA uses."""
    sin, cos = (t[:, :, None, :] for t in rope)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "dot_product", "blockwise")
# "auto": blockwise from this many query blocks on. In benchmarks/bench_train.py's quiet run blockwise (block 128)
# was 1.21x faster at 512 positions and 0.98-1.06x at 256 (where 2 blocks skip only a quarter of the scores).
AUTO_BLOCKWISE_BLOCKS = 4


def attention(q, k, v, mask=None, implementation="auto", kv_heads_first=False, block=128):
    """Softmax attention, causal when `mask` is None.

    q [B, T, H, D]; k, v [B, S, K, D], or [B, K, S, D] when `kv_heads_first` (the KV cache's layout), with H a
    multiple of K (grouped-query); mask bool [B, T, S] (True: may attend).
    implementation: "xla" (einsums, float32 softmax), "dot_product" (jax.nn.dot_product_attention; cuDNN on GPU
    for causal bf16/fp16 attention without a mask) or "blockwise" (`blockwise_causal_attention` in blocks of
    `block` queries; self-attention only, so with a KV cache it is the "xla" path), or "auto" (the default:
    "blockwise" for self-attention over at least AUTO_BLOCKWISE_BLOCKS blocks, else "xla").
    Rows whose query may attend to nothing (padding queries) hold no meaningful value in any implementation.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r} "
                         f"({' | '.join(ATTENTION_IMPLEMENTATIONS)})")
    if implementation == "dot_product":
        if kv_heads_first:
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        use_cudnn = mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"
        return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                            is_causal=mask is None, implementation="cudnn" if use_cudnn else None)
    T, S = q.shape[1], k.shape[2 if kv_heads_first else 1]
    if implementation == "auto":
        implementation = "blockwise" if T >= AUTO_BLOCKWISE_BLOCKS * block else "xla"
    if implementation == "blockwise" and not kv_heads_first and S == T:
        return blockwise_causal_attention(q, k, v, mask, block)
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), bool), k=S - T)[None]
    return _masked_attention(q, k, v, mask, kv_heads_first)


def blockwise_causal_attention(q, k, v, mask=None, block=128):
    """Causal self-attention that never computes the fully masked blocks: queries [start, end) attend only to keys
    [0, end). q [B, T, H, D]; k, v [B, T, K, D]; mask None or bool [B, T, T], applied on top of the causal one.

    Equal to the full masked softmax: a key it skips would get exp(min_float - max) = 0 weight there. Python-unrolled
    over ceil(T / block) static blocks (shapes stay static; about (n + 1) / 2n of the full score work for n blocks).
    """
    T = q.shape[1]
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        allowed = jnp.tril(jnp.ones((end - start, end), bool), k=start)[None]
        if mask is not None:
            allowed = allowed & mask[:, start:end, :end]
        outputs.append(_masked_attention(q[:, start:end], k[:, :end], v[:, :end], allowed))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def _masked_attention(q, k, v, mask, kv_heads_first=False):
    """q [B, T, H, D], k, v [B, S, K, D] (or [B, K, S, D]), mask bool [B or 1, T, S] -> [B, T, H, D]; scores and
    softmax in float32. The cache layout is read as it is (no transposed copy per decode step).

    Both matmuls run heads-major, batched over leading (B, K) dimensions, with a query group's G * T rows
    together: written over [B, T, K, G, D] directly, XLA's CPU backend transposed the [.., T, S] scores (and their
    gradients) around every matmul.
    """
    B, T, H, D = q.shape
    if not kv_heads_first:
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    K, S = k.shape[1], k.shape[2]
    G = H // K
    q = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    scores = jnp.where(mask[:, None, None], scores.reshape(B, K, G, T, S), jnp.finfo(jnp.float32).min)
    probs = reductions.softmax(scores).astype(v.dtype).reshape(B, K, G * T, S)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
    return out.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def dense(x, w, flat=False):
    """x [..., n] @ w [n, m] -> [..., m]; flat: as one 2-D matmul over all leading positions (x reshaped to
    [prod(...), n]), which XLA's CPU backend runs (and differentiates) without the transposes of a 3-D dot."""
    if not flat or x.ndim == 2:
        return _matmul(x, w)
    return _matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def _matmul(x, w):
    """x @ w. On CPU a bfloat16 one asks for a float32 result and rounds it back (the same value): XLA:CPU runs
    bf16 x bf16 -> f32 dots in YNNPACK's bf16 kernels, but rewrote a bf16 -> bf16 dot as a float32 one with both
    operands converted (a decode loop hoists the weights' conversion and reads float32 weights every step).
    gpt2_124m's bfloat16 decode step: 51 -> 36 ms at batch 8, 114 -> 89 ms at batch 32, batch 1 unchanged
    (an ad-hoc quiet A/B). Other backends keep the plain matmul (their bf16 dots are native already, and the
    float32 cotangent would make the backward matmuls mixed-precision)."""
    if x.dtype != jnp.bfloat16 or jax.default_backend() != "cpu":
        return x @ w
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with optional biases, RoPE and a KV cache.

    The q, k, v, o weights keep their [embed, heads, head_dim] shapes (and parameter paths) whatever the compute
    path: `fused_qkv` concatenates the three into one [embed, (H + 2K) * head_dim] matrix inside the step (one
    matmul instead of three), `flat_matmuls` runs the projections as 2-D matmuls over batch * length.
    """

    def __init__(self, spec, rngs):
        d, h, kv, hd, pd = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.param_dtype
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, spec.init_std)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, spec.init_std)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, spec.init_std)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, spec.residual_std)
        if spec.biases:
            self.q_bias = constant((h, hd), ("heads", "head_dim"), pd, 0.0)
            self.k_bias = constant((kv, hd), ("kv_heads", "head_dim"), pd, 0.0)
            self.v_bias = constant((kv, hd), ("kv_heads", "head_dim"), pd, 0.0)
            self.o_bias = constant((d,), ("embed",), pd, 0.0)
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        self.dtype = spec.dtype
        self.implementation = spec.attention
        self.block = spec.attention_block
        self.fused_qkv = spec.fused_qkv
        self.flat = spec.flat_matmuls

    def __call__(self, x, rope, mask, kv_cache):
        """x [B, T, d] -> ([B, T, d], updated (k, v) cache or None).

        kv_cache: None or (k, v, layer, write index): k and v this layer's cache [B, K, S, D] (layer None) or the
        whole stacked one [layers, B, K, S, D] (scan_layers); the new keys / values are written into it in place.
        """
        q, k, v = self._qkv(x)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv_cache is None:
            out = attention(q, k, v, mask, self.implementation, block=self.block)
            new_cache = None
        else:
            k_cache, v_cache, layer, index = kv_cache
            k_cache, k = _write_cache(k_cache, k, layer, index)
            v_cache, v = _write_cache(v_cache, v, layer, index)
            out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.implementation, kv_heads_first=True,
                            block=self.block)
            new_cache = (k_cache, v_cache)
        return self._output(out), new_cache

    def read_at(self, x, rope, mask, index):
        """`self(x, rope, mask, None)[0]` at positions index int [B, n] only -> [B, n, d]: keys and values over all
        T tokens, queries and the output projection at the n read positions. mask None (plain causal) or bool
        [B or 1, T, T]."""
        q = self._project(take_positions(x, index), self.q, self.q_bias)
        k, v = self._project(x, self.k, self.k_bias), self._project(x, self.v, self.v_bias)
        if rope is not None:
            q, k = apply_rope(q, tuple(take_positions(t, index) for t in rope)), apply_rope(k, rope)
        if mask is None:
            mask = jnp.arange(x.shape[1])[None, None, :] <= index[..., None]
        else:
            mask = take_positions(mask, index)
        return self._output(attention(q, k, v, mask, "xla"))

    def _output(self, out):
        """The output projection: attention out [B, T, H, D] -> [B, T, d]."""
        if self.flat:
            B, T, h, hd = out.shape
            y = dense(out.reshape(B, T, h * hd), self.o[...].astype(self.dtype).reshape(h * hd, -1), flat=True)
        else:
            y = jnp.einsum("bthd,hde->bte", out, self.o[...].astype(self.dtype))
        if self.o_bias is not None:
            y = add_bias(y, self.o_bias[...])
        return y

    def _qkv(self, x):
        """x [B, T, d] -> q [B, T, H, D], k, v [B, T, K, D]."""
        weights = (self.q, self.k, self.v)
        biases = (self.q_bias, self.k_bias, self.v_bias)
        if not self.fused_qkv:
            return tuple(self._project(x, w, b) for w, b in zip(weights, biases))
        d = x.shape[-1]
        heads = [w.shape[1] for w in weights]
        hd = self.q.shape[2]
        w = jnp.concatenate([w[...].astype(self.dtype).reshape(d, -1) for w in weights], axis=1)
        y = dense(x, w, flat=self.flat)
        if biases[0] is not None:
            y = add_bias(y, jnp.concatenate([b[...].reshape(-1) for b in biases]))
        q, k, v = jnp.split(y, [heads[0] * hd, (heads[0] + heads[1]) * hd], axis=-1)
        return tuple(t.reshape(*x.shape[:-1], n, hd) for t, n in zip((q, k, v), heads))

    def _project(self, x, w, b):
        if self.flat:
            d, n, hd = w.shape
            y = dense(x, w[...].astype(self.dtype).reshape(d, n * hd), flat=True).reshape(*x.shape[:-1], n, hd)
        else:
            y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
        return y if b is None else add_bias(y, b[...])


def take_positions(x, index):
    """x [B, T, ...] at positions index int [B, n] -> [B, n, ...] (x's batch may be 1: it broadcasts)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _write_cache(cache, new, layer, index):
    """Writes `new` [B, T, K, D] into slots index.. of the layer's `cache` [B, K, S, D] (layer None) or of `layer`
    in the stacked `cache` [layers, B, K, S, D].

    Returns (updated cache, that layer's [B, K, S, D]).
    """
    new = new.swapaxes(1, 2).astype(cache.dtype)
    if layer is None:
        cache = jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
        return cache, cache
    cache = jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, index, 0))
    return cache, jax.lax.dynamic_index_in_dim(cache, layer, axis=0, keepdims=False)


class MLP(nnx.Module):
    """GELU (tanh approximation, as GPT-2) with biases, or SwiGLU without (as LLaMA)."""

    def __init__(self, spec, rngs):
        d, f, pd = spec.d_model, spec.d_ff, spec.param_dtype
        self.gated = spec.family == "llama"
        self.up = param(rngs, (d, f), ("embed", "mlp"), pd, spec.init_std)
        self.gate = param(rngs, (d, f), ("embed", "mlp"), pd, spec.init_std) if self.gated else None
        self.down = param(rngs, (f, d), ("mlp", "embed"), pd, spec.residual_std)
        self.up_bias = constant((f,), ("mlp",), pd, 0.0) if spec.biases else None
        self.down_bias = constant((d,), ("embed",), pd, 0.0) if spec.biases else None
        self.dtype = spec.dtype
        self.flat = spec.flat_matmuls

    def __call__(self, x):
        flat = self.flat
        h = dense(x, self.up[...].astype(self.dtype), flat)
        if self.up_bias is not None:
            h = add_bias(h, self.up_bias[...])
        if self.gated:
            h = jax.nn.silu(dense(x, self.gate[...].astype(self.dtype), flat)) * h
        else:
            h = jax.nn.gelu(h, approximate=True)
        h = constrain(h, ("batch", "length", "mlp"))
        y = dense(h, self.down[...].astype(self.dtype), flat)
        return y if self.down_bias is None else add_bias(y, self.down_bias[...])


def shardings(state, mesh):
    """NamedShardings for an nnx.State (abstract or concrete) from its params' `logical_axes` through lm.mesh.RULES.

    Returns the same structure with each Variable's value replaced by its NamedSharding (what `jax.jit`'s
    out_shardings wants for an init that returns the state). A dimension its mesh axes do not divide stays replicated.
    """
    def one(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return variable.replace(lm_mesh.named_sharding(mesh, axes, variable.shape))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

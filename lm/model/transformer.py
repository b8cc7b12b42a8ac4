"""The decoder-only Transformer: GPT-2 family (learned positions, LayerNorm, GELU, tied embeddings, biases) and
LLaMA family (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head), chosen by `config.model.family`.

Decoding uses a KV cache, a plain pytree from `Transformer.init_cache`:
  k, v   n_layers arrays [batch, n_kv_heads, max_len, head_dim]: keys / values by cache slot, one buffer per layer
         (written in place; attention reads it as is). With scan_layers one stacked [n_layers, batch, ...] array,
         which the scan threads through (each layer's slice is then copied out for its attention each step).
  pos    int32 [batch, max_len]                             position of the token in each slot; -1: empty or padding
  index  int32 []                                           next slot to write (the same for every row)
Tokens whose position is negative are padding: no token attends to them. Left-padded prompts therefore take
positions like [-1, -1, 0, 1, 2]; logits at real tokens then equal those of the unpadded prompt.

Parameter paths: embed, pos_embed (GPT-2), head (untied), final_norm/{scale,bias}, blocks/<layer>/{attn_norm, mlp_norm}/
{scale,bias}, blocks/<layer>/attn/{q,k,v,o,q_bias,k_bias,v_bias,o_bias}, blocks/<layer>/mlp/{up,gate,down,up_bias,
down_bias}. With scan_layers, blocks/... holds every layer stacked on a leading `layers` axis instead of <layer>.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import mesh as lm_mesh
from lm.config import ConfigError
from lm.model.layers import (ATTENTION_IMPLEMENTATIONS, MLP, Attention, LayerNorm, RMSNorm, constrain, param,
                             rope_tables, take_positions)

RESIDUAL = ("batch", "length", "embed")
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the projection matmuls
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model hyper-parameters, resolved and checked from `config.model` (hashable, so part of the graphdef)."""
    family: str
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_len: int
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    attention_block: int = 128
    fused_qkv: bool = False
    flat_matmuls: bool = True
    remat: str = "none"
    scan_layers: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @classmethod
    def from_config(cls, model_config) -> "ModelSpec":
        if isinstance(model_config, cls):
            return model_config
        c = model_config
        family = c.get("family", "gpt2")
        spec = cls(family=family, vocab_size=int(c.get("vocab_size", 0)), n_layers=int(c.get("n_layers", 0)),
                   d_model=int(c.get("d_model", 0)), n_heads=int(c.get("n_heads", 0)),
                   n_kv_heads=int(c.get("n_kv_heads") or c.get("n_heads", 0)), d_ff=int(c.get("d_ff", 0)),
                   max_len=int(c.get("max_len", 1024)), dtype=c.get("dtype", "float32"),
                   param_dtype=c.get("param_dtype", "float32"), attention=c.get("attention", "auto"),
                   attention_block=int(c.get("attention_block", 128)), fused_qkv=bool(c.get("fused_qkv", False)),
                   flat_matmuls=bool(c.get("flat_matmuls", True)),
                   remat=c.get("remat", "none"), scan_layers=bool(c.get("scan_layers", False)),
                   rope_theta=float(c.get("rope_theta", 10000.0)), norm_eps=float(c.get("norm_eps", 1e-5)),
                   tie_embeddings=bool(c.get("tie_embeddings", family == "gpt2")),
                   init_std=float(c.get("init_std", 0.02)))
        spec.check()
        return spec

    def check(self):
        def bad(key, must):
            raise ConfigError(f"config.model.{key}={getattr(self, key)!r}: must be {must}")
        if self.family not in ("gpt2", "llama"):
            bad("family", "'gpt2' or 'llama'")
        for key in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            if getattr(self, key) < 1:
                bad(key, "a positive int (vocab_size 0 must be resolved from the tokenizer first)")
        if self.d_model % self.n_heads:
            bad("d_model", f"divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        if self.family == "llama" and self.head_dim % 2:
            bad("d_model", "such that head_dim = d_model / n_heads is even (RoPE)")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            bad("attention", " | ".join(ATTENTION_IMPLEMENTATIONS))
        if self.attention_block < 1:
            bad("attention_block", "a positive number of query positions")
        if self.remat not in ("none", *REMAT_POLICIES):
            bad("remat", "'none', 'full' or 'dots'")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16", "float16"):
                bad(key, "float32, bfloat16 or float16")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def biases(self) -> bool:
        return self.family == "gpt2"

    @property
    def residual_std(self) -> float:
        """Init scale of the projections that write into the residual stream (GPT-2: 1/sqrt(2 * n_layers))."""
        return self.init_std / (2 * self.n_layers) ** 0.5


def _norm(spec):
    norm = LayerNorm if spec.family == "gpt2" else RMSNorm
    return norm(spec.d_model, spec.norm_eps, spec.param_dtype)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, spec, rngs):
        self.attn_norm = _norm(spec)
        self.attn = Attention(spec, rngs)
        self.mlp_norm = _norm(spec)
        self.mlp = MLP(spec, rngs)

    def __call__(self, x, rope, mask, kv_cache):
        h, kv_cache = self.attn(self.attn_norm(x), rope, mask, kv_cache)
        x = constrain(x + h, RESIDUAL)
        x = constrain(x + self.mlp(self.mlp_norm(x)), RESIDUAL)
        return x, kv_cache

    def read_at(self, x, rope, mask, index):
        """`self(x, rope, mask, None)[0]` at positions index [B, n] only -> [B, n, d]: the attention's keys and
        values over all of x, everything else at the n read positions."""
        x = take_positions(x, index) + self.attn.read_at(self.attn_norm(x), rope, mask, index)
        return x + self.mlp(self.mlp_norm(x))


def _stacked_blocks(spec, rngs):
    """One Block whose parameters have a leading `layers` axis, for jax.lax.scan over depth."""
    @nnx.split_rngs(splits=spec.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def create(rngs):
        return Block(spec, rngs)
    return create(rngs)


class Transformer(nnx.Module):
    """`Transformer(config.model, rngs=nnx.Rngs(seed))`; `model(tokens)` -> float32 logits [B, T, vocab]."""

    def __init__(self, model_config, *, rngs: nnx.Rngs):
        spec = self.spec = ModelSpec.from_config(model_config)
        d, pd = spec.d_model, spec.param_dtype
        self.embed = param(rngs, (spec.vocab_size, d), ("vocab", "embed"), pd, spec.init_std)
        self.pos_embed = param(rngs, (spec.max_len, d), (None, "embed"), pd, spec.init_std) \
            if spec.family == "gpt2" else None
        if spec.scan_layers:
            self.blocks = _stacked_blocks(spec, rngs)
        else:
            self.blocks = nnx.List([Block(spec, rngs) for _ in range(spec.n_layers)])
        self.final_norm = _norm(spec)
        self.head = None if spec.tie_embeddings else \
            param(rngs, (d, spec.vocab_size), ("embed", "vocab"), pd, spec.init_std)

    def __call__(self, tokens, positions=None, cache=None):
        """tokens int32 [B, T] -> logits float32 [B, T, vocab]; with `cache`, -> (logits, updated cache).

        positions int32 [B, T] (default: 0..T-1, or each row's next positions after the cache); negative = padding.
        The same as `self.logits(self.hidden(tokens, positions))`.
        """
        out = self.hidden(tokens, positions, cache)
        if cache is None:
            return self.logits(out)
        hidden, cache = out
        return self.logits(hidden), cache

    def hidden_at(self, tokens, index, positions=None, mask=None):
        """`self.hidden(tokens, positions, mask=mask)` at positions index int [B, n] only -> [B, n, d_model]. The last
        block runs its keys and values over all T tokens, its queries, attention output and MLP at the n read
        positions only: a reward model reads one state per answer (about 5/6 of the last block skipped at
        d_ff = 4 d_model), PPO's scoring the answer columns."""
        index = jnp.asarray(index, jnp.int32)
        if self.spec.scan_layers:  # the stacked blocks run in one scan: read the full pass
            return take_positions(self.hidden(tokens, positions, mask=mask), index)
        return self.hidden(tokens, positions, mask=mask, read_at=index)

    def hidden(self, tokens, positions=None, cache=None, mask=None, read_at=None):
        """tokens int32 [B, T] -> the final (normed) hidden states [B, T, d_model] in the compute dtype, the input
        of the LM head and of scalar heads; with `cache`, -> (hidden, updated cache). Arguments as `__call__`;
        mask bool [B, T, T] (without a cache) narrows the causal mask further: True where a token may attend
        (e.g. two answers after one shared prompt, each blind to the other)."""
        spec = self.spec
        positions, attend, cache_pos = _positions_and_mask(tokens, positions, cache)
        if mask is not None:
            if cache is not None:
                raise ValueError("hidden(mask=...) is for a pass without a KV cache")
            steps = jnp.arange(tokens.shape[1])
            attend = (steps[None, :] <= steps[:, None])[None] & mask if attend is None else attend & mask
        # Gather whole rows: the table's embed dim is all-gathered first (as FSDP does for every weight), so the
        # lookup's output can take the batch sharding of `tokens` instead of the table's.
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(spec.dtype)
        safe_positions = jnp.maximum(positions, 0)
        if self.pos_embed is not None:
            _check_max_len(positions, spec.max_len)
            pos_table = constrain(self.pos_embed[...], (None, None))
            x = x + jnp.take(pos_table, safe_positions, axis=0).astype(spec.dtype)
        rope = rope_tables(safe_positions, spec.head_dim, spec.rope_theta) if spec.family == "llama" else None
        x = constrain(x, RESIDUAL)
        x, kv = self._run_blocks(x, rope, attend, cache, read_at)
        x = self.final_norm(x)
        if cache is None:
            return x
        k, v = kv
        return x, dict(k=k, v=v, pos=cache_pos, index=cache["index"] + tokens.shape[1])

    def logits(self, hidden):
        """hidden [..., d_model] (from `hidden`) -> float32 logits [..., vocab] through the LM head (tied or not)."""
        # One 2-D matmul over all positions: as a 3-D einsum, XLA's CPU backend transposes the [B, T, vocab] logits
        # gradient (and copies it twice more) for the backward matmuls, ~100M floats per step at 16 x 256 x 8192.
        dtype = self.spec.dtype
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self.head is None:
            logits = jnp.einsum("nd,vd->nv", flat, self.embed[...].astype(dtype), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("nd,dv->nv", flat, self.head[...].astype(dtype), preferred_element_type=jnp.float32)
        logits = logits.reshape(*hidden.shape[:-1], logits.shape[-1])
        if logits.ndim == 3:
            logits = constrain(logits, ("batch", "length", "vocab"))
        return logits

    def head_weight(self):
        """The LM head as [vocab, d_model] in the compute dtype: logits = hidden @ head_weight().T (the input of the
        fused cross-entropy, lm.model.logprobs.head_nll_sum)."""
        weight = self.embed[...] if self.head is None else self.head[...].T
        return weight.astype(self.spec.dtype)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens (prompt + generated)."""
        spec = self.spec
        shape = (batch_size, spec.n_kv_heads, max_len, spec.head_dim)
        dtype = dtype or spec.dtype
        if spec.scan_layers:
            k, v = (jnp.zeros((spec.n_layers, *shape), dtype) for _ in "kv")
        else:  # a buffer per layer: a stacked one would make each layer copy its slice out for attention each step
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(spec.n_layers)) for _ in "kv")
        return dict(k=k, v=v, pos=jnp.full((batch_size, max_len), -1, jnp.int32), index=jnp.zeros((), jnp.int32))

    def _run_blocks(self, x, rope, mask, cache, read_at=None):
        """The blocks in order; with a cache, each layer writes its (k, v) buffers (scan_layers: its slice of the
        stacked ones, threaded through the scan); with read_at (hidden_at's positions, unstacked blocks, no cache),
        the last block runs there only."""
        index = None if cache is None else cache["index"]
        kv = None if cache is None else (cache["k"], cache["v"])
        if self.spec.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            step = self._block_step(graphdef, rope, mask, index)

            def layer_step(carry, layer):
                return step(*carry, *layer), None
            layers = (state, jnp.arange(self.spec.n_layers, dtype=jnp.int32))
            return jax.lax.scan(layer_step, (x, kv), layers)[0]
        blocks = list(self.blocks)
        ks, vs = (None, None) if kv is None else map(list, kv)
        for i, block in enumerate(blocks if read_at is None else blocks[:-1]):
            graphdef, state = nnx.split(block)
            layer_kv = None if kv is None else (ks[i], vs[i])
            x, layer_kv = self._block_step(graphdef, rope, mask, index)(x, layer_kv, state, None)
            if kv is not None:
                ks[i], vs[i] = layer_kv
        if read_at is not None:
            return blocks[-1].read_at(x, rope, mask, read_at), kv
        return x, None if kv is None else (tuple(ks), tuple(vs))

    def _block_step(self, graphdef, rope, mask, index):
        """(x, (k, v) or None, block state, layer) -> (x, (k, v) or None), remat as config.model.remat says. k, v:
        the layer's own buffers (layer None) or the stacked ones (layer: its index)."""
        def step(x, kv, state, layer):
            kv_cache = None if kv is None else (*kv, layer, index)
            return nnx.merge(graphdef, state)(x, rope, mask, kv_cache)
        if self.spec.remat == "none":
            return step
        return jax.checkpoint(step, policy=REMAT_POLICIES[self.spec.remat], prevent_cse=not self.spec.scan_layers)


def _positions_and_mask(tokens, positions, cache):
    """Positions [B, T], attention mask ([B, T, S] bool, or None for plain causal) and the cache's new `pos`."""
    B, T = tokens.shape
    steps = jnp.arange(T, dtype=jnp.int32)
    if cache is None:
        if positions is None:
            return jnp.broadcast_to(steps, (B, T)), None, None
        causal = steps[None, :] <= steps[:, None]
        return positions, causal[None] & (positions >= 0)[:, None, :], None
    index = cache["index"]
    _check_capacity(index, T, cache["pos"].shape[1])
    if positions is None:
        positions = cache["pos"].max(axis=1, keepdims=True) + 1 + steps[None, :]
    pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions.astype(jnp.int32), index, axis=1)
    slots = jnp.arange(pos.shape[1], dtype=jnp.int32)
    causal = slots[None, :] <= (index + steps)[:, None]
    return positions, causal[None] & (pos >= 0)[:, None, :], pos


def take_cache_rows(cache: dict, rows) -> dict:
    """The KV cache (`Transformer.init_cache`'s layout, per-layer or stacked buffers) with rows `rows` int [n] of
    every buffer and of pos: e.g. each prompt's cache copied to every row that continues it."""
    def take(x):
        return jnp.take(x, rows, axis=x.ndim - 4)  # [(layers,) B, K, S, D]
    return dict(cache, k=jax.tree.map(take, cache["k"]), v=jax.tree.map(take, cache["v"]), pos=cache["pos"][rows])


def _check_capacity(index, n_new, size):
    if not isinstance(index, jax.core.Tracer) and int(index) + n_new > size:
        raise ValueError(f"KV cache overflow: {int(index)} slots used + {n_new} new tokens > cache length {size}")


def _check_max_len(positions, max_len):
    """Learned positions end at max_len. Under jit only the length is known (later decode steps go unchecked)."""
    traced = isinstance(positions, jax.core.Tracer)
    last = positions.shape[1] - 1 if traced else int(np.asarray(positions).max())  # (a jit constant stays concrete)
    if last >= max_len:
        raise ValueError(f"position {last} >= config.model.max_len={max_len} (GPT-2's learned positions)")


def stack_layers(params: dict) -> dict:
    """Pure-dict params with blocks {0: tree, 1: tree, ...} -> blocks as one tree of stacked arrays (scan layout)."""
    blocks = params["blocks"]
    layers = [blocks[i] for i in range(len(blocks))]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict, n_layers: int) -> dict:
    """The inverse of `stack_layers`."""
    blocks = params["blocks"]
    return {**params, "blocks": {i: jax.tree.map(lambda x: x[i], blocks) for i in range(n_layers)}}


def from_params(model_config, params: dict) -> Transformer:
    """A Transformer holding `params` (a pure dict as `nnx.state(model).to_pure_dict()` gives), without random init.

    Shapes must match the config exactly; values are cast to `param_dtype`.
    """
    spec = ModelSpec.from_config(model_config)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0))))
    want = {path: v.shape for path, v in nnx.to_flat_state(state)}
    got = dict(nnx.traversals.flatten_mapping(params))
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"params do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, shape in want.items():
        if tuple(got[path].shape) != tuple(shape):
            raise ValueError(f"param {'/'.join(map(str, path))}: shape {tuple(got[path].shape)}, model wants {shape}")
    cast = {path: jnp.asarray(value, spec.param_dtype) for path, value in got.items()}
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(cast))
    return nnx.merge(graphdef, state)


def param_count(model_config, include_embeddings: bool = True) -> int:
    """Parameters of the model `model_config` describes (tied weights counted once).

    include_embeddings=False counts only the blocks and the final norm ("non-embedding" parameters): not the
    token table, the learned positions, nor the output head.
    """
    s = ModelSpec.from_config(model_config)
    d, hd = s.d_model, s.head_dim
    attn = d * s.n_heads * hd * 2 + d * s.n_kv_heads * hd * 2
    mlp = (3 if s.family == "llama" else 2) * d * s.d_ff
    norm = 2 * d if s.family == "gpt2" else d
    if s.biases:
        attn += s.n_heads * hd + 2 * s.n_kv_heads * hd + d
        mlp += s.d_ff + d
    body = s.n_layers * (attn + mlp + 2 * norm) + norm
    if not include_embeddings:
        return body
    positions = s.max_len * d if s.family == "gpt2" else 0
    head = 0 if s.tie_embeddings else d * s.vocab_size
    return body + s.vocab_size * d + positions + head


def flops_per_token(model_config, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT convention: 6 N + 12 L H Q T.

    N = the parameters that take part in matmuls per token: the non-embedding parameters plus the output head
    (d_model * vocab, tied or not); embedding lookups are free. 12 L H Q T is attention's QK^T and AV
    (L layers, H heads of size Q, context T = seq_len, without halving for the causal mask).
    """
    s = ModelSpec.from_config(model_config)
    n = param_count(s, include_embeddings=False) + s.d_model * s.vocab_size
    return 6 * n + 12 * s.n_layers * s.n_heads * s.head_dim * seq_len


def cache_shardings(cache: dict, mesh) -> dict:
    """NamedShardings for a KV cache from `init_cache`: rows over the batch axes, kv heads over `tensor`."""
    kv = ("batch", "kv_heads", "length", "head_dim")

    def axes(name, value):
        if name in ("k", "v"):
            return ("layers", *kv) if value.ndim == 5 else kv
        return ("batch", "length") if name == "pos" else ()
    return {name: jax.tree.map(lambda x: lm_mesh.named_sharding(mesh, axes(name, x), x.shape), value)
            for name, value in cache.items()}

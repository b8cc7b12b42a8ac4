"""Scalar heads on the Transformer's final hidden states: the reward model's score and PPO's value.

`TransformerWithScalarHead` is a `Transformer` (same parameter paths, same `__call__`, `hidden`, `logits`) plus one
`ScalarHead` at `scalar_head/{weight,bias}`. Because the trunk's paths are a plain Transformer's, a reward or value
model starts from an SFT / pretraining checkpoint with the trunk loaded and only `scalar_head` fresh
(`Objective(init_from=..., init_fresh=("scalar_head",))`), and its checkpoints are saved and restored by the same
code as any Transformer's. It keeps the LM head, so one model can be a PPO policy and its value function at once.

Rows are read at explicit positions, e.g. each row's last real token from its length (right padding): never "the
last column", which is padding in every row but the longest.

`build(model_config, kind)` makes the model a checkpoint's meta names (`MODEL_KINDS`); `kind_of(model)` is the name.
"""
import jax.numpy as jnp
from flax import nnx

from lm.model.layers import apply_rope, attention, constant, param
from lm.model.transformer import Transformer


class ScalarHead(nnx.Module):
    """hidden [..., d] -> float32 [...]: w . hidden + b, computed in float32."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype="float32", init_std: float = 0.0):
        # std 0 (the default): every score starts at 0, so a fresh reward / value head starts neutral.
        self.weight = param(rngs, (d_model,), ("embed",), param_dtype, init_std) if init_std else \
            constant((d_model,), ("embed",), param_dtype, 0.0)
        self.bias = constant((), (), param_dtype, 0.0)

    def __call__(self, hidden):
        w = self.weight[...].astype(jnp.float32)
        return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), w) + self.bias[...].astype(jnp.float32)


def last_token_index(lengths):
    """Index of each row's last real token for right-padded rows of `lengths` real tokens (int [B] -> int32 [B]).

    A row of length 0 has no real token: it reads index 0 (its score is meaningless; callers mask such rows).
    """
    return jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)


def at_positions(values, index):
    """values [B, T, ...] read at index int [B] -> [B, ...] (row b's entry at index[b])."""
    index = jnp.asarray(index, jnp.int32).reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.take_along_axis(values, index, axis=1)[:, 0]


class TransformerWithScalarHead(Transformer):
    """A Transformer plus a scalar head on its final hidden states (reward model, value function)."""

    def __init__(self, model_config, *, rngs: nnx.Rngs, head_init_std: float = 0.0):
        super().__init__(model_config, rngs=rngs)
        self.scalar_head = ScalarHead(self.spec.d_model, rngs=rngs, param_dtype=self.spec.param_dtype,
                                      init_std=head_init_std)

    def values(self, tokens, positions=None, mask=None):
        """A scalar at every position: tokens [B, T] -> float32 [B, T] (PPO's per-token value); positions and mask
        as `Transformer.hidden`."""
        return self.scalar_head(self.hidden(tokens, positions, mask=mask))

    def hidden_at(self, tokens, index, positions=None, mask=None):
        """`hidden_at(self, ...)`: the final hidden states at `index` only, [B, n, d_model]."""
        return hidden_at(self, tokens, index, positions, mask)

    def scores(self, tokens, lengths):
        """One scalar per right-padded row, read at its last real token: tokens [B, T], lengths [B] -> float32 [B]
        (the reward model's score of a whole sequence)."""
        return self.scalar_head(self.hidden_at(tokens, last_token_index(lengths)[:, None]))[:, 0]


def hidden_at(model, tokens, index, positions=None, mask=None):
    """The final hidden states of a Transformer (or one with a scalar head) at `index` only: tokens [B, T], index
    int [B, n] -> [B, n, d_model], equal to `model.hidden(tokens, positions, mask=mask)` read there. The last
    block runs its keys and values over all T tokens but its queries, attention output and MLP at the n read
    positions only: a reward model reads one state per answer (most of the last block skipped: about 5/6 of it at
    d_ff = 4 d_model), PPO's scoring reads the answer columns only."""
    index = jnp.asarray(index, jnp.int32)
    if model.spec.scan_layers:  # the stacked blocks run in one scan: read the full pass
        return jnp.take_along_axis(model.hidden(tokens, positions, mask=mask), index[..., None], axis=1)

    def run_blocks(x, rope, attend, cache):  # Transformer.hidden's blocks, the last one at `index` only
        blocks = list(model.blocks)
        for block in blocks[:-1]:
            x, _ = block(x, rope, attend, None)
        return _last_block_at(blocks[-1], x, rope, attend, index), None

    # Transformer.hidden embeds, calls self._run_blocks, then the final norm: for this call only, an instance
    # attribute shadows the method (set past nnx's attribute checks: it is not module state).
    object.__setattr__(model, "_run_blocks", run_blocks)
    try:
        return model.hidden(tokens, positions, mask=mask)
    finally:
        object.__delattr__(model, "_run_blocks")


def _project(x, weight, bias, dtype):
    """x [B, T, d] @ weight [d, n, hd] (+ bias [n, hd]) -> [B, T, n, hd], as one 2-D matmul."""
    d, n, hd = weight.shape
    y = (x.reshape(-1, d) @ weight[...].astype(dtype).reshape(d, n * hd)).reshape(*x.shape[:-1], n, hd)
    return y if bias is None else y + bias[...].astype(dtype)


def _last_block_at(block, x, rope, mask, index):
    """`block(x, rope, mask, None)` read at index [B, n] -> [B, n, d]: keys / values over all of x, the rest at
    the n read positions (mask None: plain causal)."""
    attn = block.attn
    h = block.attn_norm(x)
    picked = jnp.take_along_axis(h, index[..., None], axis=1)
    q = _project(picked, attn.q, attn.q_bias, attn.dtype)
    k, v = (_project(h, w, b, attn.dtype) for w, b in ((attn.k, attn.k_bias), (attn.v, attn.v_bias)))
    if rope is not None:
        q = apply_rope(q, tuple(jnp.take_along_axis(t, index[..., None], axis=1) for t in rope))
        k = apply_rope(k, rope)
    if mask is None:
        mask = jnp.arange(x.shape[1])[None, None, :] <= index[..., None]
    else:
        mask = jnp.take_along_axis(mask, index[..., None], axis=1)
    out = attention(q, k, v, mask, "xla")
    B, n, H, D = out.shape
    y = (out.reshape(B * n, H * D) @ attn.o[...].astype(attn.dtype).reshape(H * D, -1)).reshape(B, n, -1)
    if attn.o_bias is not None:
        y = y + attn.o_bias[...].astype(attn.dtype)
    x = jnp.take_along_axis(x, index[..., None], axis=1) + y
    return x + block.mlp(block.mlp_norm(x))


MODEL_KINDS = {"transformer": Transformer, "scalar_head": TransformerWithScalarHead}


def build(model_config, kind: str = "transformer", *, rngs: nnx.Rngs) -> Transformer:
    """The model of `kind` (a key of MODEL_KINDS, as checkpoint meta's "model_kind" records it)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](model_config, rngs=rngs)


def kind_of(model) -> str:
    """The MODEL_KINDS name of `model`'s class (checkpoint meta records it so loaders rebuild the same model)."""
    for name, cls in MODEL_KINDS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not one of lm.model.heads.MODEL_KINDS {sorted(MODEL_KINDS)}")

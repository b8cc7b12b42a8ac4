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

from lm.model.layers import constant, param
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

    def scores(self, tokens, lengths):
        """One scalar per right-padded row, read at its last real token: tokens [B, T], lengths [B] -> float32 [B]
        (the reward model's score of a whole sequence)."""
        return self.scalar_head(self.hidden_at(tokens, last_token_index(lengths)[:, None]))[:, 0]


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

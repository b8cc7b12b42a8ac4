"""The Transformer (GPT-2 and LLaMA families), its parameter shardings, size and FLOPs."""
from lm.model.layers import shardings
from lm.model.logprobs import token_logprobs
from lm.model.transformer import (ModelSpec, Transformer, cache_shardings, flops_per_token, from_params, param_count,
                                  stack_layers, unstack_layers)

__all__ = ["ModelSpec", "Transformer", "cache_shardings", "flops_per_token", "from_params", "param_count",
           "shardings", "stack_layers", "token_logprobs", "unstack_layers"]

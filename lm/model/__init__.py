"""The Transformer (GPT-2 and LLaMA families), scalar heads (reward / value), parameter shardings, size and FLOPs."""
from lm.model.heads import (MODEL_KINDS, ScalarHead, TransformerWithScalarHead, at_positions, build,
                            kind_of, last_token_index)
from lm.model.layers import shardings
from lm.model.logprobs import head_nll_sum, token_logprobs
from lm.model.transformer import (ModelSpec, Transformer, cache_shardings, flops_per_token, from_params, param_count,
                                  stack_layers, take_cache_rows, unstack_layers)

__all__ = ["MODEL_KINDS", "ModelSpec", "ScalarHead", "Transformer", "TransformerWithScalarHead", "at_positions",
           "build", "cache_shardings", "flops_per_token", "from_params", "head_nll_sum", "kind_of",
           "last_token_index", "param_count", "shardings", "stack_layers", "take_cache_rows", "token_logprobs",
           "unstack_layers"]

"""A tiny model that trains on a laptop CPU in minutes. `configs/tiny.py:llama` selects the LLaMA family."""
from configs import base


def get_config(arg: str = "gpt2"):
    c = base.get_config()
    c.model = base.model_for_depth(2, family=arg)
    c.model.max_len = 256
    c.model.dtype = "float32"
    c.tokenizer.vocab_size = 2048
    c.train.update(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, log_every=20,
                   eval_every=100, eval_batches=4, checkpoint_every=200)
    c.sample.max_new_tokens = 48
    return c

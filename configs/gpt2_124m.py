"""GPT-2 small (124M parameters): the classic nanoGPT shape, with the GPT-2 vocabulary padded to 50304."""
from configs import base


def get_config(arg: str = "gpt2"):
    c = base.get_config()
    c.model = base.model_for_depth(12, family=arg)   # d_model 768, 12 heads
    c.model.vocab_size = 50304                       # GPT-2's 50257 padded to a multiple of 128
    c.tokenizer.kind = "pretrained"
    c.tokenizer.name = "gpt2"
    c.train.update(steps=5000, batch_size=512, seq_len=1024, grad_accum=16, lr=6e-4, warmup_steps=700)
    return c

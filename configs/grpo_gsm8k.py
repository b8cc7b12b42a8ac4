"""GRPO on GSM8K for a model imported from HF (GPT-2 124M or a small LLaMA) and fine-tuned on GSM8K-style chats,
on an accelerator.

    python -m lm.train --config=configs/grpo_gsm8k.py --workdir=W    # W/sft (the SFT run) -> W/grpo/

The init run (config.grpo.init_from, default W/sft) fixes the model; its tokenizer must carry the chat tokens (an
HF GPT-2 imported with the `gpt2` vocabulary has them appended after id 50256, so the imported embedding is padded
to the tokenizer's size). The problems are ../shared/data/posttrain/gsm8k ({train,test}.jsonl). Rollouts: 16
problems x 8 samples of up to 256 tokens; DAPO's token-mean loss with clip 0.2 / 0.28 and overlong completions
left out of the loss; a small format reward for the think/answer template; no KL (beta 0), as DAPO / Dr. GRPO.
"""
from configs import base
from lm.train import grpo


def get_config(arg: str = ""):
    c = base.get_config()
    c.objective = "grpo"
    c.model.max_len = 1024        # replaced by the init run's model section (run() copies it)
    c.grpo = grpo.default_config()
    c.grpo.update(task="gsm8k", train_problems=0, prompts=16, group_size=8, prompt_len=256, max_new_tokens=256,
                  epochs=1, minibatches=2, format_weight=0.1, mask_truncated=True, dtype="bfloat16",
                  eval_problems=256, eval_samples=8, eval_ks=(1, 8), eval_temperature=1.0)
    c.grpo.task_kwargs = dict(directory="../shared/data/posttrain/gsm8k")
    c.train.seq_len = c.grpo.prompt_len + c.grpo.max_new_tokens - 1
    c.train.update(steps=400, batch_size=64, lr=1e-6, schedule="constant", warmup_steps=10, weight_decay=0.0,
                   grad_clip=1.0, log_every=1, eval_every=50, checkpoint_every=50, keep_checkpoints=2)
    return c

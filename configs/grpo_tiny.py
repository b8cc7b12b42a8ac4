"""GRPO on synthetic arithmetic for the tiny CPU model, from the SFT run of the same workdir (W/sft -> W/grpo).

    python -m lm.train --config=configs/grpo_tiny.py --workdir=W [--config.grpo.task=compare_decimals]

The model section is taken from the init run (shapes must match it); train.batch_size and train.seq_len follow
from the rollout (prompts x group_size / minibatches rows of prompt_len + max_new_tokens - 1 tokens).
"""
from configs import sft_tiny, tiny
from lm.train import grpo


def get_config(arg: str = "arithmetic"):
    c = tiny.get_config()
    c.objective = "grpo"
    c.grpo = grpo.default_config()
    c.grpo.task = arg
    # The task as SFT taught it (configs/sft_tiny.py holds the one difficulty dial), without SFT's example count.
    sft_tasks = sft_tiny.get_config().sft.tasks
    c.grpo.task_kwargs = {k: v for k, v in sft_tasks[arg].items() if k != "n"} if arg in sft_tasks else {}
    c.grpo.update(prompts=16, group_size=8, prompt_len=32, max_new_tokens=32, epochs=1, minibatches=2,
                  eval_problems=128, eval_samples=8, eval_ks=(1, 8))
    c.train.seq_len = c.grpo.prompt_len + c.grpo.max_new_tokens - 1  # (run() derives it again)
    c.train.update(steps=60, lr=3e-4, schedule="constant", warmup_steps=0, weight_decay=0.0, log_every=1,
                   eval_every=20, checkpoint_every=20, keep_checkpoints=2)
    return c

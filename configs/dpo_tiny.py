"""DPO on the tiny pipeline (CPU, about a minute): W/sft/ -> W/dpo/ on the reward model's preference data.

    python -m lm.train --config=configs/dpo_tiny.py --workdir=W
    python -m lm.train --config=configs/dpo_tiny.py --workdir=W \
        --config.dpo.data=../shared/data/posttrain/preference/hh_rlhf_harmless_base_test.jsonl.gz
"""
import ml_collections

from configs import reward_tiny, tiny


def get_config(arg: str = ""):
    c = tiny.get_config()
    c.objective = "dpo"
    data = reward_tiny.get_config().reward
    c.dpo = ml_collections.ConfigDict(dict(
        policy="sft",               # the policy's start and the frozen reference
        run_dir="dpo",
        data=data.data, synthetic_pairs=data.synthetic_pairs, synthetic_kinds=data.synthetic_kinds,
        held_out_fraction=data.held_out_fraction, max_pairs=data.max_pairs,
        beta=0.1,
        label_smoothing=0.0,
    ))
    c.train.update(steps=200, batch_size=16, seq_len=128, lr=3e-4, warmup_steps=10, schedule="cosine",
                   log_every=20, eval_every=50, checkpoint_every=100, weight_decay=0.0)
    return c

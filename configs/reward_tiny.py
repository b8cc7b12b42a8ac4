"""The reward model on the tiny pipeline (CPU, about a minute): W/sft/ -> W/reward/.

    python -m lm.train --config=configs/reward_tiny.py --workdir=W
    python -m lm.train --config=configs/reward_tiny.py --workdir=W \
        --config.reward.data=../shared/data/posttrain/preference/hh_rlhf_harmless_base_test.jsonl.gz

The model shape comes from the init_from checkpoint (config.model here is only used for a random init).
"""
import ml_collections

from configs import tiny


def get_config(arg: str = ""):
    c = tiny.get_config()
    c.objective = "reward"
    c.reward = ml_collections.ConfigDict(dict(
        init_from="sft",            # run dir relative to the workdir (or absolute); "none": random init
        run_dir="reward",
        data="synthetic",           # "synthetic" or a path / glob of preference files (HH-RLHF, ...)
        synthetic_pairs=1024,
        synthetic_kinds=("repeated", "rambling", "wrong"),
        held_out_fraction=0.1,
        max_pairs=0,                # 0: all
        margin=0.0,                 # Bradley-Terry margin (chosen must win by this much)
        center_coef=0.01,           # pins the free offset of the scores near 0
    ))
    c.train.update(steps=200, batch_size=16, seq_len=128, lr=1e-3, warmup_steps=10, schedule="cosine",
                   log_every=20, eval_every=50, checkpoint_every=100, weight_decay=0.0)
    return c

"""PPO-RLHF on the tiny pipeline (CPU, minutes): W/sft/ + W/reward/ -> W/ppo/.

    python -m lm.train --config=configs/ppo_tiny.py --workdir=W
    python -m lm.train.hacking --workdir=W --config=configs/ppo_tiny.py:hacking        # the probe: 1 seed, base only
    python -m lm.train.hacking --workdir=W --config=configs/ppo_tiny.py:hacking_study  # 3 seeds, both interventions

One rollout of `rollout_batch` answers feeds epochs x minibatches updates; train.steps counts updates and
train.batch_size is the minibatch (rollout_batch / minibatches). The model shape comes from the policy checkpoint.
"""
import ml_collections

from configs import tiny


def ppo_section(**overrides) -> ml_collections.ConfigDict:
    section = dict(
        policy="sft",               # policy and frozen reference: a run dir relative to the workdir, or absolute
        reward="reward",            # the reward model run
        run_dir="ppo",
        prompts="synthetic",        # "synthetic" (arithmetic prompts) or preference files (their prompts)
        n_prompts=256,
        max_prompt_tokens=48,
        rollout_batch=32,
        max_new_tokens=24,
        temperature=1.0,            # 1: on-policy (the sampler's log-probs are at temperature 1)
        epochs=2,
        minibatches=2,
        gamma=1.0,
        lam=0.95,
        clip_eps=0.2,
        value_clip=0.2,
        vf_coef=0.1,
        entropy_coef=0.0,
        kl_coef=0.05,               # beta of -beta * KL per token
        kl_target=0.0,              # > 0: adaptive beta (Ziegler et al.) towards this KL per answer
        kl_horizon=10000.0,
        no_eos_penalty=1.0,         # subtracted from the score of an answer without <|assistant_end|>
        whiten_advantages=True,
        samples_kept=4,
    )
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def hacking_section(study: bool = False) -> ml_collections.ConfigDict:
    """The reward-hacking experiment's sizes (lm.train.hacking): a proxy reward model from N gold-labelled pairs of
    the policy's own answers, PPO against it, gold measured throughout, for each setting and seed. The probe (what
    lm.main runs) is the base setting with one seed; the study adds the interventions and 3 seeds."""
    return ml_collections.ConfigDict(dict(
        run_dir="hacking",
        policy="sft",               # the base policy; "none": a freshly initialised tiny model (tests)
        seeds=(0, 1, 2) if study else (0,),
        # reward-model pairs and KL coefficients: the first of each is the base setting, the others should delay
        # the gold turnover
        pairs=(128, 1024) if study else (128,),
        kl_coefs=(0.02, 0.3) if study else (0.02,),
        # Bradley-Terry labels: P(a preferred) = sigmoid((gold_a - gold_b) / this). Gold gaps between two answers
        # are ~0.2-1 (one digit more: ~0.2), so 0.05 makes the labels mostly, not always, follow the gold order
        label_temperature=0.05,
        eval_pairs=256 if study else 128,  # held-out gold-order pairs (own seed) every proxy's accuracy is measured on
        bon_n=(1, 2, 4, 8, 16, 32),
        bon_prompts=32,
        proxy_steps=120,
        proxy_batch=16,
        proxy_lr=1e-3,
        rollouts=24,
        smooth=5 if study else 3,   # rollouts in the moving average that finds the gold peak
    ))


def get_config(arg: str = ""):
    c = tiny.get_config()
    c.objective = "ppo"
    c.ppo = ppo_section()
    c.train.update(steps=4 * 40, batch_size=16, seq_len=72, lr=3e-5, warmup_steps=0, schedule="constant",
                   log_every=4, eval_every=0, checkpoint_every=40, weight_decay=0.0, grad_clip=1.0)
    if arg in ("hacking", "hacking_study"):
        c.hacking = hacking_section(study=arg == "hacking_study")
        c.train.lr = 1e-4  # the policy moves far enough from the base within the rollouts for the proxy to be gamed
        c.ppo.n_prompts = 1024  # distinct prompts for the pairs (up to 1024 of them) and the rollouts
        if arg == "hacking_study":  # twice the answers per rollout: the gold curve's noise is what hides its peak
            c.ppo.rollout_batch, c.train.batch_size = 64, 32
    elif arg:
        raise ValueError(f"configs/ppo_tiny.py:{arg}: unknown variant (use '', 'hacking' or 'hacking_study')")
    return c

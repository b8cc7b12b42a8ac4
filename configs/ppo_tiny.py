"""PPO-RLHF on the tiny pipeline (CPU, minutes): W/sft/ + W/reward/ -> W/ppo/.

    python -m lm.train --config=configs/ppo_tiny.py --workdir=W
    python -m lm.train.hacking --workdir=W --config=configs/ppo_tiny.py:hacking        # the probe: 1 seed, base only
    python -m lm.train.hacking --workdir=W --config=configs/ppo_tiny.py:hacking_study  # 3 seeds, both interventions

One rollout of `rollout_batch` answers feeds epochs x minibatches updates; train.steps counts updates and
train.batch_size is the minibatch (rollout_batch / minibatches). The model shape comes from the policy checkpoint.

Reward-hacking runs (lm.train.hacking; base policy: the default lm.main tiny SFT run; all timings and runs on the
shared 2-core machine, contended, indicative). "acc" is a proxy's accuracy on the 256 held-out gold-order pairs.

- 2026-12-02 earlier session (label temperature 0.25, 512 vs 64 pairs, KL 0.2 vs 0.02, 32-answer rollouts, seeds
  0, 1): turnover visible but both interventions peaked earlier; proxies 0.53-0.67 on their own labels. Its pairs
  were re-rendered answer text: 68% had an empty side (thinking-only completions) and were dropped, so PPO found
  completions the proxy had never seen.
- A (rows re-rendered from answer text, empties kept, temperature 0.05, 64-answer rollouts, lr 1e-4, seed 0):
  acc 64 pairs 0.684, 256 0.859, 1024 0.918; but PPO on raw completions went to thinking-only ones (answer "",
  gold 0) the proxy scored ~+1.5: base (64, 0.02) gold peak at rollout 0, then -0.07 while proxy +0.76;
  kl 0.3: peak rollout 11 (sqrt KL 0.76); 1024 pairs: peak rollout 0, gold -0.16, proxy +1.05 (sqrt KL 2.9).
  Hence the pairs are now the policy's own completion ids, as PPO scores them.
- B (completion-id rows, seed 0): acc 64 pairs 0.543, 128 0.602, 1024 0.746 (label follows the gold order in
  61-66% of pairs: the rest are gold ties). 128 pairs, KL 0.02, lr 1e-4, 24 rollouts: gold rose 0.29 -> 0.40 to
  the end (sqrt KL 2.45), no turnover.
- C (as B, lr 3e-4, 32 rollouts, 128 pairs, seed 0): base gold peak rollout 26 (sqrt KL 3.21, +0.15), then
  -0.002; KL 0.3: peak rollout 26 (sqrt KL 1.67, +0.06), then -0.024: the proxy was good enough that gold hardly
  turned, and beta 0.3 mostly held KL (final sqrt KL ~1.4-1.8) without a later peak.
- D (the hacking_study preset as below: 64 vs 1024 pairs, KL 0.02 vs 0.3, lr 3e-4, 24 rollouts of 64, seeds 0-2):
  acc 64 pairs 0.612 (seeds 0.54, 0.66, 0.64), 1024 pairs 0.770 (0.75, 0.83, 0.73). Gold peak (5-rollout
  smoothing) rollout / sqrt KL / gold gain, seeds 0, 1, 2: base 13/2.83/+0.09, 23/3.29/+0.15, 22/2.43/+0.04 (a
  turnover only in seed 0: -0.07 after, proxy +0.30; seeds 1-2 peak at or next to the end); KL 0.3 17/1.25/+0.03,
  11/1.59/+0.05, 18/1.05/+0.04 (KL held at sqrt ~1.3: gold barely moves, peak later than base in 1 of 3 seeds,
  never further in sqrt KL); 1024 pairs 17/3.64/+0.24, 23/4.02/+0.25, 23/3.27/+0.22 (peak +0.80 sqrt KL further
  than base in 3 of 3 seeds, +1.7 rollouts later on average, +0.14 gold at the peak; 2 of 3 still rising).
  Best-of-32 against the 64-pair proxy (KL 2.5): gold +0.05 to +0.17 over n=1. Outputs in /tmp/hk/final; each
  seed's run took ~25 min of the contended machine (seeds 1, 2 in parallel processes, then one aggregating pass).
- E (the preset as below: 48 rollouts, KL 0.05 vs 0.02, 64 vs 1024 pairs, seeds 0-2, base policy: a fresh
  default lm.main SFT run, gold 0.36 at rollout 0 vs 0.15 in D; 9 PPO runs as parallel processes, contended).
  Peak (5-rollout smoothing) rollout / update / sqrt KL / gold, seeds 0, 1, 2: base 0/0/0.00/0.375,
  28/112/3.35/0.535, 42/168/3.50/0.469 (seed 0: gold falls from the start, the 64-pair proxy is gamed at once);
  KL 0.05 0/0/0.00/0.377, 27/108/2.41/0.481, 39/156/2.43/0.493 (KL held lower, gold falls more slowly: -0.04
  after the peak vs -0.10 for base, but the peak is not later: 0 of 3 seeds); 1024 pairs 31/124/3.02/0.517,
  28/112/2.41/0.530, 34/136/3.61/0.545 (later in 1 of 3 seeds, further in sqrt KL in 2, peak gold +0.07). Neither
  delay holds in 3 of 3 seeds from this SFT start; a KL arm that delays the peak still needs a run whose base
  climbs first (D's start) or a beta picked on seed 0 (not done: no time). Outputs in /tmp/ppw/w/hacking_study.
- F (the preset as below: 32 rollouts, 128 vs 1024 pairs, beta 0.01 vs 0.03, seeds 0-2, base: the 500-step SFT
  of a default lm.main run; settings fixed in advance, not tuned on seed 0). acc 128 pairs 0.655, 1024 0.775.
  Peak rollout / sqrt KL, seeds 0, 1, 2: base 9/2.52 (then -0.16 gold), 27/4.24 (-0.015), 10/2.87 (-0.06);
  beta 0.03 31/2.53, 30/2.68, 31/2.56 (later in 3 of 3, 2 still rising at the end; not further in sqrt KL: the
  penalty delays in updates, not along KL); 1024 pairs 28/3.02, 29/2.69, 3/2.09 (later in 2 of 3, further in 1).
  Outputs in /tmp/hack6/hacking; benchmarks/results/hacking.json.
- G (declared 2026-12-03 before running; the preset as below): F left "more pairs delay the turnover" at 2 of 3
  seeds, with the 1024-pair proxy trained for the same 120 steps as the 128-pair one (~2.3 passes over its pairs,
  where the 128-pair proxy had ~19). G changes only the pairs arm: 128 vs 4096 pairs (32x instead of 8x), every
  proxy trained for at least 3 passes over its train pairs (proxy_epochs; 4096 pairs: 615 steps; 128 pairs: still
  120), same KL arm (0.01 vs 0.03), seeds 0-2, base: the SFT of a default lm.main run of 2026-12-03 (greedy pass@1
  0.336). Judged as in F: the peak (5-rollout smoothing) later in rollouts than the base, seed by seed; sqrt KL
  reported beside it. Result (11 min, shared machine): acc 128 pairs 0.594, 4096 0.790. Peak rollout / sqrt KL,
  seeds 0, 1, 2: base 20/3.88, 15/3.03, 8/2.39 (gold gains only ~0.1, flat); 4096 pairs 31/3.72, 26/3.26, 30/4.08
  (later in 3 of 3, +11/+11/+22 rollouts; further in sqrt KL in 2); beta 0.03 11/2.43, 20/2.27, 4/1.86 (later in
  1 of 3: with a flat base gold curve its peak is noise). Outputs in /tmp/mainrun2/hacking_g;
  benchmarks/results/hacking_g.json.
- H (declared 2026-12-03 after G, before running): the KL arm needs a base whose gold rises before it can turn
  over; G's 128-pair proxy (0.59) gave a flat one. H: the G preset with pairs=(512,) (one proxy per seed, 3
  passes), kl_coefs 0.01 vs 0.03, seeds 0-2, the same SFT start; judged as F and G. Result (5 min): acc 0.707;
  peak rollout / sqrt KL, seeds 0, 1, 2: base 31/3.14 (still rising), 10/2.74 (then -0.085), 5/2.30 (-0.158);
  beta 0.03 17/2.74, 26/2.39, 16/2.73: later in 2 of 3 (-14/+16/+11), and it loses less gold after its peak
  (-0.024 vs -0.081 on average). benchmarks/results/hacking_h.json.
- I (declared 2026-12-04 before running; the preset as below). F, G and H each judged the per-seed argmax of the
  training rollouts' 64-answer gold curve (prompts redrawn every rollout): its noise is the size of the delays.
  I changes the measurement, not the experiment: every 2 rollouts and at the last, the live policy answers one
  fixed held-out set (256 test-split arithmetic prompts x 2 answers, one fixed sampling key in every evaluation and
  run), giving gold and KL to the base on the same 512 answers (17 points a run); per run, gold is fitted against
  d = sqrt KL by Gao et al.'s RL form c + alpha d - beta d ln d, whose maximum d* = exp(alpha / beta - 1) is the
  peak when it lies within the run, at the update where the run's held-out sqrt KL reached d*. Settings: H's base
  (512 pairs, beta 0.01), beta 0.03, 4096 pairs; seeds 0-2; base policy: the SFT of a default lm.main run of
  2026-12-04. Judged: an intervention delays the turnover in a seed when its fitted peak comes at a later update
  than that seed's base peak, the base having turned within its run (a run that never turns counts its last
  update, a lower bound); sqrt KL of the peak reported beside it (Gao et al. expect more pairs to move it, a KL
  penalty not). The argmax of the held-out points (3-point smoothing) and the old rollout-curve peak are reported
  as well but do not decide. Result (5.5 min, quiet machine; proxy acc 512 pairs 0.707, 4096 0.790, as in H): the
  base's held-out gold does not turn over within 32 rollouts in 2 of 3 seeds: it rises to ~0.45 by rollout 4 and
  then wanders +-0.04 on a plateau (KL stops growing at sqrt ~3.2; the held-out standard error is 0.016, so the
  wandering is the policy's, not the measurement's) and only seed 2 collapses (0.43 -> 0.23 at sqrt KL 4.2 in
  its last 4 rollouts). So by the declared rule neither arm is shown (later in 1 of 3 seeds each: the base turned
  in one). What held in 3 of 3 seeds: 4096 pairs end higher on held-out gold (0.69 / 0.51 / 0.61 vs the base's
  0.51 / 0.40 / 0.23) and further in sqrt KL in 2 of 3, never turning within the run; beta 0.03 holds KL lower
  (sqrt 2.8 / 2.7 / 3.0 vs 3.2 / 3.3 / 4.2) at about the base's gold. The turnovers of H's rollout curve at
  rollouts 10 and 5 (seeds 1, 2) were noise. benchmarks/results/hacking_i.json.
- J (declared 2026-12-04 after I, before running): I's setting and rule with 64 rollouts instead of 32 (the one
  change; I's base had not turned by rollout 32 in 2 of 3 seeds), held-out points still every 2 rollouts (33 a
  run); the proxies are I's (the same seeds and pairs). Result (7 min, quiet machine): by the declared rule (fitted
  peaks) **each arm is later in 2 of 3 seeds**: the base's fit turned within its run in seeds 1 and 2 only (seed
  0's held-out gold hovered 0.45-0.55 to the end), and there both arms peak at the run's end (lower bounds; +233 /
  +246 updates). The Gao form fits these curves poorly: they rise by rollout 2-4, wander on a plateau, and the base
  of seed 2 collapses from rollout ~34 (held-out gold 0.43 -> 0.04, sqrt KL 3.4 -> 4.6: empty answers, thinking
  that never ends, which the 512-pair proxy scores +1.3 to +1.5), so a fitted peak lands near the start (update 6
  for seed 2). The held-out argmax (reported, not deciding) is later for **both arms in 3 of 3 seeds** (beta 0.03:
  +6 / +22 / +8 rollouts; 4096 pairs: +2 / +37 / +42, further in sqrt KL in 3 of 3). Final held-out gold, seeds
  0 / 1 / 2: base 0.54 / 0.44 / 0.04, beta 0.03 0.51 / 0.43 / 0.45, 4096 pairs 0.70 / 0.54 / 0.63.
  benchmarks/results/hacking_j.json.
- K (declared 2026-12-04 after J, before running): a replication of J on new seeds 3, 4, 5
  (--config.hacking.seeds=3,4,5), judged by the model-free rule J suggested: an intervention delays the turnover in
  a seed when the argmax of its held-out gold curve (3-point smoothing) comes at a later update than that seed's
  base argmax (a base whose argmax is its last point cannot be beaten: that seed shows nothing). Both arms shown
  if later in 3 of 3 seeds. Result (8 min incl. the new seeds' proxies, quiet machine; proxy acc 512 pairs 0.671,
  4096 0.763): **4096 pairs later in 3 of 3 seeds** (+52 / +38 / +19 rollouts, further in sqrt KL in 3 of 3);
  **beta 0.03 later in 2 of 3** (+24 / +12 / -18 rollouts): in seed 5 the base climbed to 0.61 at rollout 44 and
  fell to 0.44, while beta 0.03 peaked at 0.54 at rollout 26 and lost only 0.05. Held-out argmax over J and K's
  six seeds: pairs later in 6 of 6, beta 0.03 in 5 of 6; the base lost 0.19 / 0.08 / 0.19 after its peak in K,
  beta 0.03 0.06 / 0.06 / 0.04. benchmarks/results/hacking_k.json.
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
        drift_every=8,              # rollouts between sampler-vs-trainer log-prob checks (one LM head pass each)
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
        pairs=(512, 4096) if study else (64,),  # study G: 128 vs 4096 (a 128-pair proxy's gold stayed flat)
        # (0.3 held sqrt KL at ~1.3, no peak to delay; 0.05 vs 0.02 did not delay; 0.03 vs 0.01 did, in updates)
        kl_coefs=(0.01, 0.03) if study else (0.02,),
        # Bradley-Terry labels: P(a preferred) = sigmoid((gold_a - gold_b) / this). Gold gaps between two answers
        # are ~0.2-1 (one digit more: ~0.2), so 0.05 makes the labels mostly, not always, follow the gold order
        label_temperature=0.05,
        eval_pairs=256 if study else 128,  # held-out gold-order pairs (own seed) every proxy's accuracy is measured on
        bon_n=(1, 2, 4, 8, 16, 32),
        bon_prompts=32,
        proxy_steps=120,
        proxy_epochs=3.0 if study else 0.0,  # at least this many passes over a proxy's train pairs (0: proxy_steps)
        proxy_batch=16,
        proxy_lr=1e-3,
        # studies F-I: 32 (I: the 512-pair base had not turned by then in 2 of 3 seeds); J: 64. The probe: 24
        rollouts=64 if study else 24,
        checkpoint_rollouts=8 if study else 0,  # 0: the PPO runs checkpoint only at their end
        smooth=5 if study else 3,   # rollouts in the moving average that finds the gold peak
        # the held-out gold curve (lm.train.hacking.HeldOutGold; study I): every `gold_eval_every` rollouts and at
        # the last, gold and KL of `gold_eval_samples` answers to each of `gold_eval_prompts` fixed test-split prompts
        gold_eval_every=2 if study else 4,
        gold_eval_prompts=256 if study else 64,
        gold_eval_samples=2 if study else 1,
        smooth_eval=3,              # held-out points in the moving average of the model-free (argmax) peak
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
            c.train.lr = 3e-4  # at 1e-4 a 128-pair proxy's gold was still rising after 24 rollouts (KL 6 nats)
    elif arg:
        raise ValueError(f"configs/ppo_tiny.py:{arg}: unknown variant (use '', 'hacking' or 'hacking_study')")
    return c

"""Reward hacking, measured (after Gao, Schulman & Hilton 2022, "Scaling laws for reward model overoptimization"):
a hidden programmatic gold reward labels pairs of the base policy's own answers, a proxy reward model learns from N
of them, PPO optimises the proxy, and every update logs proxy score, gold score and KL to the base policy.

    python -m lm.train.hacking --workdir=W                                             # the probe (lm.main's)
    python -m lm.train.hacking --workdir=W --config=configs/ppo_tiny.py:hacking_study  # 3 seeds, interventions

Writes W/hacking/: hacking_report.json, hacking.png (proxy and gold gain over the base policy vs sqrt(KL), one
panel per setting, every seed, best-of-n as the comparison curve), and the runs (proxy_<N>_s<seed>/,
ppo_<setting>_s<seed>/).

The gold reward (`gold_reward`, never seen by the proxy except through labels), on the answer text of an
arithmetic prompt: 1 if the answer names the correct result, plus 1 - exp(-digits / 3) (task-relevant: answers are
numbers; diminishing returns in the number of digit characters), minus `2 * repetition` where repetition is the
fraction of the answer's character trigrams that repeat an earlier one (a run of one digit or one motif scores
near 1). The base policy's answers rarely repeat, so a proxy from few of them learns mostly "digits are good"; PPO
then finds runs of digits, which the gold reward first pays for and then penalises. More pairs hold more of the
rare repetitive answers and the saturation, so their proxy should stay honest further from the base policy.

Labels are Bradley-Terry samples: a pair (a, b) of two answers to one prompt has a preferred with probability
sigmoid((gold_a - gold_b) / label_temperature); identical answers are dropped, empty ones kept (gold 0: a proxy
that never saw an empty answer scores it anywhere, and PPO finds that first). Every proxy is also measured on one
yardstick: `eval_pairs` pairs of its own seed in gold order (ties dropped), the same for every N and seed, so its
accuracy by N compares proxies, not label noise. Settings: the base (the first `pairs`, the first `kl_coefs`),
each further KL coefficient (with the base pairs) and each further pair count (with the base KL coefficient); every
setting for every seed (the seed draws the pairs, the labels, the proxy's head and the PPO run). Best-of-n against
the same proxy is drawn from the base policy: KL = log n - (n - 1) / n (rl_math.best_of_n_kl).

With `gold_eval_every` > 0 (HeldOutGold), the policy also answers one fixed held-out prompt set every that many
rollouts, and gold and KL are measured on those answers: a curve whose points differ by the policy only. Its peak is
the maximum of Gao et al.'s RL form fitted per run (fitted_peak), compared seed by seed in `held_out_delays`
(fitted_delays); the argmax of the held-out points is reported beside it.

The gold peak of a run is the maximum of its gold curve smoothed over `smooth` rollouts; the report states per
setting when gold peaked (rollout, optimizer updates before it, sqrt(KL) and gold; mean and per seed) and what it did
after, and ("delays") how many rollouts and updates later, and how much further in sqrt(KL), each intervention's
gold peaked than the base setting's, seed by seed. The study's PPO runs checkpoint every `checkpoint_rollouts`
rollouts, so a run killed midway resumes (bit-exact) where it stopped; finished runs and proxies are reused, so
running the seeds or settings as separate processes and then the whole study once aggregates them.
"""
import json
import math
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import model as lm_model
from lm import sample
from lm.data import preferences
from lm.eval import graders
from lm.tokenizer import chat
from lm.train import ppo, reward, rl_math

RUN_DIR = "hacking"
REPETITION_COST = 2.0
EVAL_SEED = 10 ** 6  # draws the gold-order pairs every proxy is measured on


# --- the hidden gold reward ----------------------------------------------------------------------------------------

def repetition(text: str) -> float:
    """Fraction of the text's character trigrams (whitespace squeezed) that repeat an earlier one: 0 for distinct
    text, near 1 for a run of one character or one short motif ("6868686868": 0.75); 0 below 2 trigrams."""
    text = " ".join(text.split())
    grams = [text[i:i + 3] for i in range(len(text) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def gold_reward(answer: str, reference: str | None) -> float:
    """Correct result named (+1) + 1 - exp(-digits / 3) - 2 * repetition (see the module doc)."""
    correct = float(reference is not None and graders.is_correct(answer, reference))
    digits = sum(c.isdigit() for c in answer)
    return correct + (1.0 - math.exp(-digits / 3.0)) - REPETITION_COST * repetition(answer)


def gold_metrics(items, answers, ended) -> dict:
    """PPO's extra rollout metric: the gold reward of every answer."""
    return {"gold": np.asarray([gold_reward(a, item["reference"]) for item, a in zip(items, answers)], np.float32)}


# --- answers of the base policy ------------------------------------------------------------------------------------

def sample_answers(model, tokenizer, items, key, config, n: int) -> list[list[tuple]]:
    """n answers per prompt item from `model` at temperature 1: [[(answer ids, answer text), ...], ...]."""
    ppo_config = config.ppo
    prompts = [item["ids"] for item in items for _ in range(n)]
    out = sample.generate_ids(model, prompts, key, int(ppo_config.max_new_tokens), sample.Sampling(),
                              stop_ids=[tokenizer.token_id(chat.ASSISTANT_END)], vocab_size=tokenizer.n_vocab)
    answers = []
    for row in range(len(prompts)):
        ids = [int(i) for i in out.tokens[row, :out.lengths[row]]]
        answers.append((ids, chat.parse_completion(tokenizer, ids).answer))
    return [answers[i * n:(i + 1) * n] for i in range(len(items))]


def gold_pairs(model, tokenizer, pool, config, n_pairs: int, seed: int, temperature: float) -> tuple[list, dict]:
    """`n_pairs` preference pairs of the base policy's completions (two to one prompt) labelled by a Bradley-Terry
    sample of the gold reward at `temperature` (0: the gold order, ties dropped): [(PreferencePair of the answer
    texts, chosen row ids, rejected row ids, prompt length)], a row being prompt ids + completion ids exactly as PPO
    scores them (thinking included: re-rendering only the answer text would hide from the proxy what PPO then shows
    it).
    Identical completions are dropped and counted; one whose answer is empty (e.g. thinking that never ended)
    stays, with gold 0."""
    rng = np.random.default_rng([seed, 17])
    pairs, stats, draw = [], dict(drawn=0, dropped_identical=0, dropped_tied=0, label_follows_gold=0), 0
    while len(pairs) < n_pairs:
        items = [pool[i] for i in rng.choice(len(pool), 64)]
        key = jax.random.fold_in(jax.random.key(seed + 1000), draw)
        draw += 1
        for item, ((ids_a, a), (ids_b, b)) in zip(items, sample_answers(model, tokenizer, items, key, config, 2)):
            stats["drawn"] += 1
            if ids_a == ids_b:
                stats["dropped_identical"] += 1
                continue
            gap = gold_reward(a, item["reference"]) - gold_reward(b, item["reference"])
            if temperature > 0:
                prefer_a = rng.random() < 1.0 / (1.0 + math.exp(-gap / temperature))
            elif gap:
                prefer_a = gap > 0
            else:
                stats["dropped_tied"] += 1
                continue
            stats["label_follows_gold"] += int(prefer_a == (gap > 0) if gap else 0)
            (chosen, chosen_ids), (rejected, rejected_ids) = ((a, ids_a), (b, ids_b))[::1 if prefer_a else -1]
            pair = preferences.PreferencePair(item["messages"], chosen, rejected, f"gold:{seed}", len(pairs))
            pairs.append((pair, item["ids"] + chosen_ids, item["ids"] + rejected_ids, len(item["ids"])))
            if len(pairs) == n_pairs:
                break
        if draw > 50 * (1 + n_pairs // 64):
            raise RuntimeError(f"only {len(pairs)} usable pairs after {stats['drawn']} draws: {stats}")
    stats["label_follows_gold"] /= max(len(pairs), 1)  # ties count as not following
    return pairs, stats


def pair_rows(pairs: list, tokenizer, width: int) -> dict:
    """gold_pairs' pairs as the reward model's rows (lm.data.preferences.tokenize_pairs' layout): right-padded to
    `width`, the mask on the completion's targets, lengths to the last real token (where the score is read)."""
    pad = chat.pad_id(tokenizer)
    rows = {}
    for k, side in ((1, "chosen"), (2, "rejected")):
        ids = np.full((len(pairs), width), pad, np.int32)
        mask = np.zeros((len(pairs), width - 1), np.float32)
        for i, pair in enumerate(pairs):
            ids[i, :len(pair[k])] = pair[k]
            mask[i, pair[3] - 1:len(pair[k]) - 1] = 1.0
        rows.update({f"{side}_ids": ids, f"{side}_mask": mask,
                     f"{side}_lengths": np.asarray([len(pair[k]) for pair in pairs], np.int32)})
    return rows


def gold_order_rows(model, tokenizer, pool, config) -> dict:
    """The yardstick every proxy is measured on: `eval_pairs` pairs (own seed, never trained on) in gold order."""
    pairs, _ = gold_pairs(model, tokenizer, pool, config, int(config.hacking.eval_pairs), EVAL_SEED, 0.0)
    return pair_rows(pairs, tokenizer, row_width(config))


# --- the held-out gold curve ----------------------------------------------------------------------------------------

class HeldOutGold:
    """PPO's extra_eval: the live policy's gold and KL to the base policy on one fixed held-out set, every
    `gold_eval_every` rollouts and at the last one. The set: `gold_eval_prompts` arithmetic prompts of the test split
    (never a rollout's or a pair's prompt) x `gold_eval_samples` answers at temperature 1, sampled with one fixed key
    at every evaluation and in every run, so successive points and the settings differ by the policy, not by the
    draw. KL is the mean over answers of the summed log-ratio log pi(token) - log base(token) of the answer's tokens
    (the sampler's log-probs against the base model's on the same rows): a Monte-Carlo estimate of KL(pi || base)."""

    def __init__(self, config, base_model, tokenizer, last_rollout: int):
        hacking = config.hacking
        self.every, self.last = int(hacking.get("gold_eval_every", 0)), last_rollout
        ppo_config = ml_collections.ConfigDict(dict(config.ppo.to_dict(), n_prompts=int(hacking.gold_eval_prompts)))
        items, _ = ppo.prompt_pool(ppo_config, tokenizer, EVAL_SEED, split="test")
        self.items = [item for item in items for _ in range(int(hacking.gold_eval_samples))]
        self.base_model, self.tokenizer, self.max_new = base_model, tokenizer, int(config.ppo.max_new_tokens)

    def due(self, index: int) -> bool:
        return self.every > 0 and (index % self.every == 0 or index == self.last)

    def __call__(self, model, index: int) -> dict:
        if not self.due(index):
            return {}
        tok, prompts = self.tokenizer, [item["ids"] for item in self.items]
        out = sample.generate_ids(model, prompts, jax.random.key(EVAL_SEED), self.max_new, sample.Sampling(),
                                  stop_ids=[tok.token_id(chat.ASSISTANT_END)], vocab_size=tok.n_vocab)
        gold = np.asarray([gold_reward(chat.parse_completion(tok, out.tokens[b, :out.lengths[b]]).answer,
                                       item["reference"]) for b, item in enumerate(self.items)])
        return dict(gold_eval=float(gold.mean()), gold_eval_se=float(gold.std() / math.sqrt(len(gold))),
                    kl_eval=float(np.mean(self.log_ratios(prompts, out))))

    def log_ratios(self, prompts, out) -> np.ndarray:
        """[B]: sum over each answer's tokens of the sampler's log-prob minus the base model's."""
        rows = [list(p) + [int(t) for t in out.tokens[b, :out.lengths[b]]] for b, p in enumerate(prompts)]
        base, _ = sample.score_tokens(self.base_model, *right_padded(rows, chat.pad_id(self.tokenizer)))
        base = np.asarray(base)
        return np.asarray([float(np.sum(out.logprobs[b, :out.lengths[b]])) -
                           float(np.sum(base[b, len(p) - 1:len(p) - 1 + out.lengths[b]]))
                           for b, p in enumerate(prompts)])


def right_padded(rows: list, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows (lists of ids) as (int32 [B, longest] right-padded with `pad`, lengths int32 [B])."""
    tokens = np.full((len(rows), max(map(len, rows))), pad, np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    return tokens, np.asarray([len(row) for row in rows], np.int32)


def row_width(config) -> int:
    return int(config.ppo.max_prompt_tokens) + int(config.ppo.max_new_tokens) + 1


# --- one setting -----------------------------------------------------------------------------------------------------

def proxy_steps(hacking, train_pairs: int) -> int:
    """proxy_steps, or more where proxy_epochs (> 0) passes over the train pairs need more: a fixed step count
    would see only part of a large pair set, so it would not show what more pairs buy."""
    batch = int(hacking.proxy_batch)
    needed = math.ceil(float(hacking.get("proxy_epochs", 0.0)) * train_pairs / batch)
    return max(int(hacking.proxy_steps), needed)


def proxy_config(config, seed: int, train_pairs: int):
    hacking = config.hacking
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    c.reward = ml_collections.ConfigDict(dict(margin=0.0, center_coef=0.01))
    steps = proxy_steps(hacking, train_pairs)
    c.train.update(steps=steps, batch_size=int(hacking.proxy_batch), lr=float(hacking.proxy_lr), warmup_steps=5,
                   schedule="cosine", eval_every=steps, checkpoint_every=steps, log_every=max(steps // 4, 1),
                   seq_len=row_width(config))
    return c


def train_proxy(config, base, model, tokenizer, pool, n_pairs, seed, out_dir, yardstick) -> dict:
    """The proxy reward model of `n_pairs` gold-labelled pairs (seed `seed`) in out_dir; its report, with its
    accuracy on the gold order of the yardstick pairs (gold_order_rows)."""
    run_dir = out_dir / f"proxy_{n_pairs}_s{seed}"
    if (run_dir / reward.REPORT).exists():
        report = json.loads((run_dir / reward.REPORT).read_text())
    else:
        pairs, stats = gold_pairs(model, tokenizer, pool, config, n_pairs, seed,
                                  float(config.hacking.label_temperature))
        train, held = preferences.split_pairs([pair[0] for pair in pairs], 0.2, seed)
        c = proxy_config(config, seed, len(train))
        train_rows, held_rows = (pair_rows([pairs[p.line] for p in split], tokenizer, row_width(config))
                                 for split in (train, held))
        report = reward.train_reward_model(c, run_dir, base, tokenizer, train_rows, held_rows,
                                           extra_report=dict(pairs=stats, n_pairs=n_pairs))
    proxy, _, _, _ = reward.load_reward_model(run_dir)
    return dict(report, gold_order=reward.pair_metrics(proxy, yardstick, 64))


def ppo_run(config, base, tokenizer, pool, proxy_dir, kl_coef, seed, name, out_dir, held_out=None) -> list[dict]:
    """PPO against the proxy in out_dir/ppo_<name>_s<seed>; its per-rollout curve (kl, score, gold, ...; with
    `held_out` (HeldOutGold) also gold_eval and kl_eval at its rollouts)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    c.ppo.kl_coef = float(kl_coef)
    updates = int(c.ppo.epochs) * int(c.ppo.minibatches)
    steps = int(config.hacking.rollouts) * updates
    # checkpoints every `checkpoint_rollouts` rollouts (0: only at the end): a long run killed midway resumes
    every = int(config.hacking.get("checkpoint_rollouts", 0)) * updates or steps
    c.train.update(steps=steps, checkpoint_every=every)
    run_dir = out_dir / f"ppo_{name}_s{seed}"
    meta = dict(reward.tokenizer_meta(tokenizer, base, {}), hacking=dict(setting=name, seed=seed))
    ppo.train_ppo(c, run_dir, base, proxy_dir, tokenizer, meta, pool, extra_metrics=gold_metrics, extra_eval=held_out)
    return ppo.curves(run_dir)


def best_of_n(config, model, tokenizer, pool, proxy_dir, seed) -> list[dict]:
    """Proxy (normalised as PPO sees it) and gold of the best of the first n answers by the proxy, mean over
    prompts, for each n of config.hacking.bon_n; KL = log n - (n - 1) / n."""
    hacking = config.hacking
    ns = sorted(int(n) for n in hacking.bon_n)
    rng = np.random.default_rng([seed, 23])
    items = [pool[i] for i in rng.choice(len(pool), int(hacking.bon_prompts))]
    answers = sample_answers(model, tokenizer, items, jax.random.key(seed + 2000), config, ns[-1])
    proxy, _, _, stats = reward.load_reward_model(proxy_dir)
    rows = [item["ids"] + ids for item, group in zip(items, answers) for ids, _ in group]
    tokens, lengths = right_padded(rows, chat.pad_id(tokenizer))
    scores = reward.score_rows(proxy, tokens, lengths, 64).reshape(len(items), ns[-1])
    scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
    gold = np.asarray([[gold_reward(text, item["reference"]) for _, text in group]
                       for item, group in zip(items, answers)])
    out = []
    for n in ns:
        best = np.argmax(scores[:, :n], axis=1)
        pick = np.arange(len(items))
        out.append(dict(n=n, kl=float(rl_math.best_of_n_kl(n)), proxy=float(np.mean(scores[pick, best])),
                        gold=float(np.mean(gold[pick, best]))))
    return out


# --- analysis --------------------------------------------------------------------------------------------------------

def smooth(values, width: int) -> np.ndarray:
    """Trailing-and-leading moving average of `width` points (shorter at the ends)."""
    values = np.asarray(values, np.float64)
    half = max(width, 1) // 2
    return np.asarray([values[max(0, i - half):i + half + 1].mean() for i in range(len(values))])


def peak_of(curve: list[dict], width: int) -> dict:
    """Where the smoothed gold curve peaks, and what gold and proxy did from there to the end."""
    gold = smooth([r["gold"] for r in curve], width)
    proxy = smooth([r["score"] for r in curve], width)
    i = int(np.argmax(gold))
    sqrt_kl = [math.sqrt(max(r["kl"], 0.0)) for r in curve]
    # updates: the optimizer updates the policy had when it sampled that rollout (its first update's step - 1)
    return dict(rollout=int(curve[i]["index"]), update=int(curve[i]["step"]) - 1, sqrt_kl=sqrt_kl[i],
                gold_at_peak=float(gold[i]),
                gold_gain_at_peak=float(gold[i] - gold[0]), gold_change_after=float(gold[-1] - gold[i]),
                proxy_change_after=float(proxy[-1] - proxy[i]), final_sqrt_kl=sqrt_kl[-1],
                at_end=i == len(curve) - 1)


def held_out_curve(curve: list[dict]) -> list[dict]:
    """The rollouts where HeldOutGold measured, as curve records whose kl and gold are the held-out set's (what
    peak_of reads)."""
    return [dict(r, kl=r["kl_eval"], gold=r["gold_eval"]) for r in curve if "gold_eval" in r]


def held_out_points(curve: list[dict]) -> list[dict]:
    """The rollouts where HeldOutGold measured: rollout, update (before it), sqrt KL and gold on the held-out set."""
    return [dict(rollout=int(r["index"]), update=int(r["step"]) - 1, sqrt_kl=math.sqrt(max(r["kl"], 0.0)),
                 gold=float(r["gold"])) for r in held_out_curve(curve)]


def _d_log_d(d) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return np.where(d > 0, d * np.log(np.maximum(d, 1e-300)), 0.0)  # its limit 0 at d = 0


def gao_gold(d, c: float, alpha: float, beta: float) -> np.ndarray:
    """Gao et al.'s RL form of gold against d = sqrt(KL), plus the base's level: c + alpha * d - beta * d * ln(d)."""
    return c + alpha * np.asarray(d, np.float64) - beta * _d_log_d(d)


def fit_gao(d, gold) -> tuple[float, float, float]:
    """(c, alpha, beta) of gao_gold by least squares."""
    d = np.asarray(d, np.float64)
    design = np.stack([np.ones_like(d), d, -_d_log_d(d)], axis=1)
    (c, alpha, beta), *_ = np.linalg.lstsq(design, np.asarray(gold, np.float64), rcond=None)
    return float(c), float(alpha), float(beta)


def fitted_peak(curve: list[dict]) -> dict | None:
    """Where the gold curve fitted on the held-out points (fit_gao, against sqrt KL) peaks: d* = exp(alpha / beta - 1)
    when beta > 0, its gold gain over c, and the update at which the run's held-out sqrt KL first reached d*
    (interpolated between points). A peak beyond the run's last point (or no peak, beta <= 0: the fit never turns)
    is not a turnover within the run: `inside` False and the update is the run's last, a lower bound.
    None without held-out points."""
    points = held_out_points(curve)
    if len(points) < 3:
        return None
    d, updates = [p["sqrt_kl"] for p in points], [p["update"] for p in points]
    c, alpha, beta = fit_gao(d, [p["gold"] for p in points])
    d_star = math.exp(min(alpha / beta - 1.0, 50.0)) if beta > 0 else math.inf
    inside = d_star <= max(d)
    update = float(updates[-1])
    if inside:  # the first point at or beyond d*, and the one before it (below d*)
        i = next(i for i, x in enumerate(d) if x >= d_star)
        frac = (d_star - d[i - 1]) / (d[i] - d[i - 1]) if i else 0.0
        update = float(updates[i - 1] + frac * (updates[i] - updates[i - 1])) if i else float(updates[0])
    d_peak = d_star if inside else max(d)
    gain = float(gao_gold(d_peak, 0.0, alpha, beta))
    return dict(c=c, alpha=alpha, beta=beta, sqrt_kl=d_peak, update=update, gold_gain=gain, inside=inside,
                final_sqrt_kl=d[-1], gold_change_after=points[-1]["gold"] - (c + gain) if inside else 0.0)


def describe(name: str, peaks: list[dict], rollouts: int) -> str:
    """One line: when gold peaked (mean over seeds) and what it did after."""
    mean = lambda key: float(np.mean([p[key] for p in peaks]))
    at_end = sum(p["at_end"] for p in peaks)
    per_seed = "; ".join(f"rollout {p['rollout']}, update {p['update']}, sqrt KL {p['sqrt_kl']:.2f}, gold "
                         f"{p['gold_at_peak']:.3f}, after {p['gold_change_after']:+.3f}" for p in peaks)
    line = (f"{name}: gold peaked at rollout {mean('rollout'):.1f} of {rollouts} (update {mean('update'):.0f}, "
            f"sqrt KL {mean('sqrt_kl'):.2f}, gold {mean('gold_at_peak'):.3f}), then changed by "
            f"{mean('gold_change_after'):+.3f} to the end while the proxy changed by "
            f"{mean('proxy_change_after'):+.3f}; per seed: {per_seed}")
    if at_end:
        line += f" ({at_end} of {len(peaks)} seeds still rising at the end: no turnover within the run)"
    return line


def describe_fit(name: str, fits: list[dict | None]) -> str:
    """One line per setting: where the fitted held-out gold curve of each seed peaked, or that it did not turn."""
    per_seed = "; ".join(
        "too few held-out points to fit" if f is None else
        f"sqrt KL {f['sqrt_kl']:.2f} at update {f['update']:.0f}, gain {f['gold_gain']:+.3f}, then "
        f"{f['gold_change_after']:+.3f} to the end" if f["inside"] else
        f"no turnover within the run (furthest sqrt KL {f['sqrt_kl']:.2f}, fitted gain {f['gold_gain']:+.3f} there)"
        for f in fits)
    return f"{name}: fitted held-out gold peak per seed: {per_seed}"


def delays(runs: list[dict], key: str = "peak") -> dict:
    """Each intervention against the base setting, seed by seed: how many rollouts (and optimizer updates) later its
    gold peaked, and how much further in sqrt(KL) (a run still rising at its end counts its last rollout: a lower
    bound on the delay), and the gold it reached. `key`: the runs' peak_of record to compare."""
    base = {r["seed"]: r[key] for r in runs if r["setting"] == "base"}
    out = {}
    for name in dict.fromkeys(r["setting"] for r in runs if r["setting"] != "base"):
        pairs = [(r[key], base[r["seed"]]) for r in runs if r["setting"] == name and r["seed"] in base]
        later = [p["rollout"] - b["rollout"] for p, b in pairs]
        updates = [p["update"] - b["update"] for p, b in pairs]
        further = [p["sqrt_kl"] - b["sqrt_kl"] for p, b in pairs]
        out[name] = dict(delay_per_seed=later, mean_delay=float(np.mean(later)), later_in=sum(d > 0 for d in later),
                         update_delay_per_seed=updates, mean_update_delay=float(np.mean(updates)),
                         sqrt_kl_delay_per_seed=further, mean_sqrt_kl_delay=float(np.mean(further)),
                         further_in=sum(d > 0 for d in further),
                         seeds=len(later), gold_peak_gain=float(np.mean([p["gold_at_peak"] - b["gold_at_peak"]
                                                                         for p, b in pairs])))
        out[name]["line"] = (f"{name} vs base: gold peaked {out[name]['mean_delay']:+.1f} rollouts / "
                             f"{out[name]['mean_update_delay']:+.0f} updates later on average (per seed {later} "
                             f"rollouts, {updates} updates; later in {out[name]['later_in']} of {len(later)} seeds), "
                             f"at {out[name]['mean_sqrt_kl_delay']:+.2f} sqrt(KL) (per seed "
                             f"{', '.join(f'{d:+.2f}' for d in further)}; further in {out[name]['further_in']}), "
                             f"peak gold {out[name]['gold_peak_gain']:+.3f}")
    return out


def fitted_delays(runs: list[dict]) -> dict:
    """The declared comparison (study I): each intervention against the base seed by seed at the fitted held-out
    peaks (fitted_peak): how many updates later and how much further in sqrt(KL) its gold peaked, and its fitted
    peak gain. An intervention is later (further) in a seed only where the base turned over within its run; where
    the base did not, the base's figure is a lower bound and the seed shows nothing."""
    base = {r["seed"]: r["fit"] for r in runs if r["setting"] == "base"}
    out = {}
    for name in dict.fromkeys(r["setting"] for r in runs if r["setting"] != "base"):
        pairs = [(r["fit"], base[r["seed"]]) for r in runs
                 if r["setting"] == name and r["fit"] and base.get(r["seed"])]
        updates = [p["update"] - b["update"] for p, b in pairs]
        further = [p["sqrt_kl"] - b["sqrt_kl"] for p, b in pairs]
        gain = [p["gold_gain"] - b["gold_gain"] for p, b in pairs]
        later_in = sum(d > 0 and b["inside"] for d, (_, b) in zip(updates, pairs))
        further_in = sum(d > 0 and b["inside"] for d, (_, b) in zip(further, pairs))
        out[name] = dict(update_delay_per_seed=updates, sqrt_kl_delay_per_seed=further, gold_gain_delta_per_seed=gain,
                         later_in=later_in, further_in=further_in, seeds=len(pairs),
                         base_turned_in=sum(b["inside"] for _, b in pairs),
                         intervention_turned_in=sum(p["inside"] for p, _ in pairs))
        out[name]["line"] = (
            f"{name} vs base (fitted held-out peaks): {', '.join(f'{d:+.0f}' for d in updates)} updates later "
            f"(later in {later_in} of {len(pairs)} seeds), sqrt(KL) {', '.join(f'{d:+.2f}' for d in further)} "
            f"(further in {further_in}), peak gold gain {', '.join(f'{d:+.3f}' for d in gain)}; the base turned "
            f"within its run in {out[name]['base_turned_in']} of {len(pairs)} seeds, the intervention in "
            f"{out[name]['intervention_turned_in']}")
    return out


def proxy_accuracy(proxies: dict) -> dict:
    """Each pair count's proxies on the yardstick's gold order, per seed and mean, and as one line."""
    by_n = {}
    for (n, seed), p in sorted(proxies.items()):
        by_n.setdefault(n, []).append(p["gold_order"]["accuracy"])
    out = {str(n): dict(per_seed=a, mean=float(np.mean(a))) for n, a in by_n.items()}
    line = "proxy accuracy on held-out gold-order pairs: " + ", ".join(
        f"{n} pairs {v['mean']:.3f} (seeds {', '.join(f'{x:.2f}' for x in v['per_seed'])})" for n, v in out.items())
    return dict(by_pairs=out, line=line)


def plot(path, settings: dict, runs: list[dict], bon: dict) -> None:
    """Proxy and gold gain over the first rollout vs sqrt(KL), one panel per setting; best-of-n in black. With
    held-out points, a second row: held-out gold against optimizer updates, each seed's argmax marked (where the
    delays are read)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_out = any(held_out_points(r["curve"]) for r in runs)
    fig, axes = plt.subplots(2 if held_out else 1, len(settings), figsize=(5 * len(settings), 8 if held_out else 4),
                             squeeze=False, sharey="row")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, setting) in zip(axes[0], settings.items()):
        for k, run_ in enumerate(r for r in runs if r["setting"] == name):
            curve = run_["curve"]
            x = [math.sqrt(max(r["kl"], 0.0)) for r in curve]
            color = colors[k % len(colors)]
            points = held_out_points(curve)
            if points:  # gold on the held-out set, and its fit (dotted)
                x_held = np.asarray([p["sqrt_kl"] for p in points])
                ax.plot(x_held, [p["gold"] - points[0]["gold"] for p in points], "-o", ms=2, color=color,
                        label=f"held-out gold, seed {run_['seed']}")
                if run_.get("fit"):
                    f, d = run_["fit"], np.linspace(0.0, x_held.max(), 60)
                    ax.plot(d, gao_gold(d, f["c"], f["alpha"], f["beta"]) - points[0]["gold"], ":", color=color,
                            lw=1)
            else:
                ax.plot(x, [r["gold"] - curve[0]["gold"] for r in curve], "-", color=color,
                        label=f"gold, seed {run_['seed']}")
            ax.plot(x, [r["score"] - curve[0]["score"] for r in curve], "--", color=color, alpha=0.6,
                    label=f"proxy, seed {run_['seed']}")
        for seed, points in bon.items():
            if points and setting["pairs"] == points[0]["pairs"]:
                x = [math.sqrt(p["kl"]) for p in points]
                ax.plot(x, [p["gold"] - points[0]["gold"] for p in points], "k-o", ms=3, lw=1,
                        label="best-of-n gold" if seed == min(bon) else None)
                ax.plot(x, [p["proxy"] - points[0]["proxy"] for p in points], "k--o", ms=3, lw=1, alpha=0.5,
                        label="best-of-n proxy" if seed == min(bon) else None)
        ax.set_title(f"{name}: {setting['pairs']} pairs, KL coef {setting['kl_coef']}", fontsize=9)
        ax.set_xlabel("sqrt(KL(policy || base))  [nats^0.5]")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("gain over the base policy")
    axes[0][0].legend(fontsize=7)
    if held_out:
        _plot_against_updates(axes[1], settings, runs, colors)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_against_updates(axes, settings: dict, runs: list[dict], colors) -> None:
    for ax, name in zip(axes, settings):
        for k, run_ in enumerate(r for r in runs if r["setting"] == name):
            points = held_out_points(run_["curve"])
            if not points:
                continue
            color = colors[k % len(colors)]
            ax.plot([p["update"] for p in points], [p["gold"] for p in points], "-", color=color, lw=1,
                    label=f"held-out gold, seed {run_['seed']}")
            peak = run_.get("held_out_peak")
            if peak:
                ax.plot([peak["update"]], [peak["gold_at_peak"]], "v", color=color, ms=8)
        ax.set_xlabel("optimizer updates")
    axes[0].set_ylabel("held-out gold (v: argmax, 3-point smoothing)")
    axes[0].legend(fontsize=7)


# --- the experiment --------------------------------------------------------------------------------------------------

def base_policy(config, workdir, out_dir):
    """(run, config with its model, tokenizer): config.hacking.policy, or "none": a fresh tiny random Transformer
    saved once as out_dir/base_policy (tests; its answers vary, which is all the experiment needs)."""
    run = reward.source_run(workdir, config.hacking.get("policy", "sft"))
    if run is None:
        run = out_dir / "base_policy"
        c, tokenizer, _ = reward.setup_from_source(config, workdir, None)
        if not (run / "checkpoints").exists():
            model = lm_model.Transformer(c.model, rngs=nnx.Rngs(c.seed))
            checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(run))
            checkpoints.save(0, {"params": nnx.split(model, nnx.Param, ...)[1]},
                             dict(config=c.to_dict(), tokenizer_hash=tokenizer.hash, objective="random",
                                  model_kind="transformer",
                                  tokenizer_dir=str((pathlib.Path(workdir) / "tokenizer").absolute())))
            checkpoints.close()
    config, tokenizer, _ = reward.setup_from_source(config, workdir, run)
    return run, config, tokenizer


def settings_of(hacking) -> dict:
    pairs, coefs = [int(n) for n in hacking.pairs], [float(b) for b in hacking.kl_coefs]
    settings = {"base": dict(pairs=pairs[0], kl_coef=coefs[0])}
    settings.update({f"kl_{b:g}": dict(pairs=pairs[0], kl_coef=b) for b in coefs[1:]})
    settings.update({f"pairs_{n}": dict(pairs=n, kl_coef=coefs[0]) for n in pairs[1:]})
    return settings


def run(config, workdir) -> dict:
    hacking = config.hacking
    out_dir = pathlib.Path(workdir) / hacking.get("run_dir", RUN_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, config, tokenizer = base_policy(config, workdir, out_dir)
    pool, prompt_stats = ppo.prompt_pool(config.ppo, tokenizer, 0)
    model, _, _ = lm_checkpoint.load_model(base)
    settings = settings_of(hacking)
    seeds = [int(s) for s in hacking.seeds]
    yardstick = gold_order_rows(model, tokenizer, pool, config)
    held_out = HeldOutGold(config, model, tokenizer, int(hacking.rollouts) - 1) \
        if int(hacking.get("gold_eval_every", 0)) else None
    proxies, runs, bon = {}, [], {}
    for seed in seeds:
        for n_pairs in sorted({s["pairs"] for s in settings.values()}):
            proxies[(n_pairs, seed)] = train_proxy(config, base, model, tokenizer, pool, n_pairs, seed, out_dir,
                                                   yardstick)
        base_proxy = out_dir / f"proxy_{settings['base']['pairs']}_s{seed}"
        bon[seed] = [dict(p, pairs=settings["base"]["pairs"])
                     for p in best_of_n(config, model, tokenizer, pool, base_proxy, seed)]
        for name, setting in settings.items():
            proxy_dir = out_dir / f"proxy_{setting['pairs']}_s{seed}"
            curve = ppo_run(config, base, tokenizer, pool, proxy_dir, setting["kl_coef"], seed, name, out_dir,
                            held_out)
            points = held_out_curve(curve)
            runs.append(dict(setting=name, seed=seed, **setting, curve=curve,
                             peak=peak_of(curve, int(hacking.smooth)), fit=fitted_peak(curve),
                             held_out_peak=peak_of(points, int(hacking.get("smooth_eval", 3))) if points else None,
                             proxy_gold_order_accuracy=proxies[(setting["pairs"], seed)]["gold_order"]["accuracy"]))
            logging.info("hacking %s seed %d: %s", name, seed, runs[-1]["peak"])
    rollouts = int(hacking.rollouts)
    lines = {name: describe(name, [r["peak"] for r in runs if r["setting"] == name], rollouts) for name in settings}
    compared = delays(runs)
    held_out_compared = dict(fitted=fitted_delays(runs), argmax=delays(runs, "held_out_peak")) if held_out else {}
    accuracy = proxy_accuracy(proxies)
    held_out_lines = [describe_fit(name, [r["fit"] for r in runs if r["setting"] == name])
                      for name in settings] if held_out else []
    held_out_lines += [f"held-out argmax: {d['line']}" for d in held_out_compared.get("argmax", {}).values()]
    held_out_lines += [d["line"] for d in held_out_compared.get("fitted", {}).values()]
    png = out_dir / "hacking.png"
    plot(png, settings, runs, bon)
    report = dict(settings=settings, seeds=seeds, rollouts=rollouts, prompts=prompt_stats, summary=lines,
                  delays=compared, held_out_delays=held_out_compared, held_out_lines=held_out_lines,
                  lr=float(config.train.lr),
                  gold_reward=gold_reward.__doc__, plot=str(png), best_of_n=bon,
                  runs=runs, samples=_samples(out_dir, runs, seeds[0]),
                  proxy_accuracy=accuracy,
                  proxies={f"{n}_s{s}": dict(held_out=p["held_out"], gold_order=p["gold_order"], pairs=p.get("pairs"))
                           for (n, s), p in proxies.items()})
    (out_dir / "hacking_report.json").write_text(json.dumps(report, indent=2, default=str))
    for line in [*lines.values(), *(d["line"] for d in compared.values()), *held_out_lines, accuracy["line"]]:
        print(line)
    return report


def _samples(out_dir, runs, seed) -> dict:
    """Answers at each setting's gold peak and at the end (the given seed)."""
    out = {}
    for r in runs:
        if r["seed"] != seed:
            continue
        folder = out_dir / f"ppo_{r['setting']}_s{seed}" / "samples"
        last = int(r["curve"][-1]["index"])
        out[r["setting"]] = dict(peak_rollout=r["peak"]["rollout"], last_rollout=last,
                                 at_peak=json.loads((folder / f"{r['peak']['rollout']}.json").read_text()),
                                 at_end=json.loads((folder / f"{last}.json").read_text()))
    return out


if __name__ == "__main__":
    from absl import app, flags

    from lm import config as lm_config

    _CONFIG = lm_config.define_config_flag("configs/ppo_tiny.py:hacking")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline workdir (tokenizer/, the base policy run).")
    flags.mark_flag_as_required("workdir")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run(lm_config.validate(_CONFIG.value), _WORKDIR.value)

    app.run(main)

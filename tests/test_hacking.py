"""The reward-hacking experiment end to end at a tiny size (one seed, three settings, a random base policy): the
report, the plot and the samples at the gold peak and the end are written; the gold reward's parts by hand."""
import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm import sample
from lm.model import Transformer
from lm.tokenizer import chat
from lm.train import hacking, reward
from tests.test_reward import make_pipeline_workdir, tiny_config


def test_gold_reward_by_hand():
    assert hacking.repetition("7 7 7 7") == pytest.approx(1 - 2 / 5)  # trigrams "7 7", " 7 ": 2 of 5 distinct
    assert hacking.repetition("The answer is 68.") == 0.0
    assert hacking.repetition("6868686868") == pytest.approx(0.75)       # a run of one motif is repetition too
    assert hacking.gold_reward("The answer is 68.", "68") == pytest.approx(1 + 1 - math.exp(-2 / 3))
    assert hacking.gold_reward("6868686868", "12") == pytest.approx(1 - math.exp(-10 / 3) - 2 * 0.75)
    assert hacking.gold_reward("", "1") == 0.0


def test_proxy_steps_cover_the_declared_passes_over_large_pair_sets():
    hacking_ = ml_collections.ConfigDict(dict(proxy_steps=120, proxy_batch=16, proxy_epochs=3.0))
    assert hacking.proxy_steps(hacking_, 3276) == 615  # ceil(3 * 3276 / 16): 3 passes over 4096 pairs' 80%
    assert hacking.proxy_steps(hacking_, 102) == 120   # a small set keeps the step floor
    hacking_.proxy_epochs = 0.0
    assert hacking.proxy_steps(hacking_, 3276) == 120


def test_peak_and_description():
    curve = [dict(index=i, step=4 * i + 1, kl=i / 4, score=float(i), gold=g)  # 4 updates a rollout
             for i, g in enumerate([0, 1, 2, 3, 2, 1, 0])]
    peak = hacking.peak_of(curve, 1)
    assert peak["rollout"] == 3 and peak["gold_change_after"] == -3 and peak["proxy_change_after"] == 3
    assert peak["update"] == 12  # the updates before rollout 3
    assert peak["sqrt_kl"] == pytest.approx(math.sqrt(0.75)) and not peak["at_end"]
    line = hacking.describe("base", [peak], 7)
    assert line.startswith("base: gold peaked at rollout 3.0 of 7") and "-3.000" in line
    assert "rollout 3, update 12, sqrt KL 0.87" in line  # per seed
    later = dict(peak, rollout=5, update=20, sqrt_kl=1.5)
    runs = [dict(setting="base", seed=0, peak=peak), dict(setting="kl_0.1", seed=0, peak=later)]
    delay = hacking.delays(runs)["kl_0.1"]
    assert delay["delay_per_seed"] == [2] and delay["update_delay_per_seed"] == [8] and delay["further_in"] == 1
    assert "+8 updates later" in delay["line"]


def test_experiment_end_to_end(tmp_path):
    workdir = make_pipeline_workdir(tmp_path)
    config = tiny_config("configs/ppo_tiny.py:hacking", hacking__policy="none", hacking__seeds=(0,),
                         hacking__pairs=(16, 32), hacking__kl_coefs=(0.05, 0.5), hacking__rollouts=3,
                         hacking__proxy_steps=4, hacking__proxy_batch=8, hacking__bon_n=(1, 2, 4),
                         hacking__bon_prompts=8, hacking__eval_pairs=16, ppo__rollout_batch=16, ppo__minibatches=2,
                         ppo__epochs=1,
                         ppo__max_new_tokens=8, ppo__max_prompt_tokens=32, ppo__n_prompts=64,
                         train__batch_size=8, train__seq_len=40, model__init_std=0.2, hacking__gold_eval_every=1,
                         hacking__gold_eval_prompts=6, hacking__gold_eval_samples=2)
    report = hacking.run(config, workdir)
    out = workdir / "hacking"
    assert (out / "hacking.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "hacking_report.json").read_text())
    assert set(saved["summary"]) == {"base", "kl_0.5", "pairs_32"} == set(saved["samples"])
    assert set(saved["delays"]) == {"kl_0.5", "pairs_32"} and saved["delays"]["kl_0.5"]["seeds"] == 1
    assert all(line.startswith(f"{name}: gold peaked at rollout") for name, line in saved["summary"].items())
    for run in report["runs"]:
        assert [r["index"] for r in run["curve"]] == [0, 1, 2]
        # held-out points at every rollout; at rollout 0 the policy is the base: KL 0
        assert [r["index"] for r in run["curve"] if "gold_eval" in r] == [0, 1, 2]
        assert abs(run["curve"][0]["kl_eval"]) < 1e-3 and math.isfinite(run["curve"][2]["kl_eval"])
        assert set(run["fit"]) >= {"c", "alpha", "beta", "update", "inside"} and run["held_out_peak"]["rollout"] <= 2
        assert all(math.isfinite(r["gold"]) and math.isfinite(r["score"]) for r in run["curve"])
    assert [p["n"] for p in saved["best_of_n"]["0"]] == [1, 2, 4]
    assert set(saved["proxy_accuracy"]["by_pairs"]) == {"16", "32"}
    assert all(0 <= p["gold_order"]["accuracy"] <= 1 and p["gold_order"]["pairs"] == 16
               for p in saved["proxies"].values())
    assert saved["best_of_n"]["0"][0]["kl"] == 0.0
    assert saved["samples"]["base"]["at_end"] and "gold" in saved["samples"]["base"]["at_peak"][0]
    assert set(saved["held_out_delays"]["argmax"]) == {"kl_0.5", "pairs_32"}
    assert set(saved["held_out_delays"]["fitted"]) == {"kl_0.5", "pairs_32"}
    assert saved["held_out_lines"][0].startswith("base: fitted held-out gold peak per seed: ")


def test_delays_compare_each_intervention_with_the_base_seed_by_seed():
    def run(setting, seed, rollout, gold):
        return dict(setting=setting, seed=seed, peak=dict(rollout=rollout, update=4 * rollout, gold_at_peak=gold,
                                                         sqrt_kl=rollout / 10))
    runs = [run("base", 0, 5, 1.0), run("base", 1, 7, 1.2), run("kl_0.2", 0, 9, 1.1), run("kl_0.2", 1, 6, 1.4),
            run("pairs_512", 0, 5, 1.0), run("pairs_512", 1, 7, 1.2)]
    out = hacking.delays(runs)
    assert out["kl_0.2"]["delay_per_seed"] == [4, -1] and out["kl_0.2"]["mean_delay"] == 1.5
    assert out["kl_0.2"]["later_in"] == 1 and out["kl_0.2"]["gold_peak_gain"] == pytest.approx(0.15)
    assert out["pairs_512"]["later_in"] == 0 and out["pairs_512"]["mean_delay"] == 0
    assert out["kl_0.2"]["sqrt_kl_delay_per_seed"] == pytest.approx([0.4, -0.1]) and out["kl_0.2"]["further_in"] == 1
    assert out["kl_0.2"]["line"].startswith("kl_0.2 vs base: gold peaked +1.5 rollouts / +6 updates later")


def _held_out_curve(d_values, gold_values, updates_per_rollout=4):
    return [dict(index=i, step=updates_per_rollout * i + 1, kl=d * d, score=0.0, gold=0.0, kl_eval=d * d, gold_eval=g)
            for i, (d, g) in enumerate(zip(d_values, gold_values))]


def test_fitted_peak_recovers_gaos_form_and_interpolates_the_update():
    d = np.linspace(0.0, 3.0, 13)                       # sqrt KL 0, 0.25, ..., 3 at rollouts 0..12
    c, alpha, beta = 0.4, 0.3, 0.2                      # d* = exp(0.3 / 0.2 - 1) = e^0.5 = 1.6487
    gold = c + alpha * d - beta * np.where(d > 0, d * np.log(np.maximum(d, 1e-12)), 0.0)
    fit = hacking.fitted_peak(_held_out_curve(d, gold))
    assert (fit["c"], fit["alpha"], fit["beta"]) == pytest.approx((c, alpha, beta), abs=1e-9)
    d_star = math.exp(0.5)
    assert fit["inside"] and fit["sqrt_kl"] == pytest.approx(d_star)
    # d* lies between rollout 6 (d 1.5, 24 updates before it) and 7 (d 1.75, 28 updates): 24 + 4 * (d* - 1.5) / 0.25
    assert fit["update"] == pytest.approx(24 + 4 * (d_star - 1.5) / 0.25)
    assert fit["gold_gain"] == pytest.approx(alpha * d_star - beta * d_star * math.log(d_star))
    assert fit["gold_change_after"] == pytest.approx(gold[-1] - (c + fit["gold_gain"]))
    rising = hacking.fitted_peak(_held_out_curve(d, 0.4 + 0.1 * d))  # a straight line: no turnover
    assert not rising["inside"] and rising["update"] == 48 and rising["sqrt_kl"] == 3.0
    assert hacking.fitted_peak(_held_out_curve(d[:2], gold[:2])) is None  # under 3 points: no fit
    assert "no turnover within the run" in hacking.describe_fit("base", [rising])
    assert "sqrt KL 1.65 at update" in hacking.describe_fit("base", [fit])


def test_fitted_delays_count_only_seeds_whose_base_turned():
    def fit(update, d, inside=True, gain=0.1):
        return dict(update=update, sqrt_kl=d, inside=inside, gold_gain=gain)
    runs = [dict(setting="base", seed=0, fit=fit(20, 2.0)), dict(setting="base", seed=1, fit=fit(60, 3.0, False)),
            dict(setting="kl_0.03", seed=0, fit=fit(44, 1.9, gain=0.2)),
            dict(setting="kl_0.03", seed=1, fit=fit(64, 2.5))]
    out = hacking.fitted_delays(runs)["kl_0.03"]
    assert out["update_delay_per_seed"] == [24, 4] and out["sqrt_kl_delay_per_seed"] == pytest.approx([-0.1, -0.5])
    assert out["later_in"] == 1 and out["further_in"] == 0 and out["base_turned_in"] == 1  # seed 1: base never turned
    assert out["gold_gain_delta_per_seed"] == pytest.approx([0.1, 0.0])
    assert out["line"].startswith("kl_0.03 vs base (fitted held-out peaks): +24, +4 updates later (later in 1 of 2")


def test_held_out_gold_against_full_forward_passes_of_both_models(tmp_path):
    """HeldOutGold's KL (the sampler's log-probs minus the base's) equals the one from full forward passes of the
    policy and the base over the same rows; its gold is gold_reward of the parsed answers; it measures only when due."""
    workdir = make_pipeline_workdir(tmp_path)
    config = tiny_config("configs/ppo_tiny.py:hacking", hacking__gold_eval_every=2, hacking__gold_eval_prompts=3,
                         hacking__gold_eval_samples=2, ppo__max_new_tokens=6, model__init_std=0.2)
    config, tok, _ = reward.setup_from_source(config, workdir, None)
    base, policy = (Transformer(config.model, rngs=nnx.Rngs(seed)) for seed in (0, 1))
    held = hacking.HeldOutGold(config, base, tok, last_rollout=3)
    assert len(held.items) == 6 and held(policy, 1) == {} and held.due(2) and held.due(3) and not held.due(1)
    measured = held(policy, 0)
    prompts = [item["ids"] for item in held.items]
    out = sample.generate_ids(policy, prompts, jax.random.key(hacking.EVAL_SEED), 6, sample.Sampling(),
                              stop_ids=[tok.token_id(chat.ASSISTANT_END)], vocab_size=tok.n_vocab)
    rows = [p + out.tokens[b, :out.lengths[b]].tolist() for b, p in enumerate(prompts)]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    lengths = np.asarray([len(r) for r in rows])
    policy_lp, base_lp = (np.asarray(sample.score_tokens(m, tokens, lengths)[0], np.float64) for m in (policy, base))
    kl = np.mean([np.sum(policy_lp[b, len(p) - 1:len(rows[b]) - 1] - base_lp[b, len(p) - 1:len(rows[b]) - 1])
                  for b, p in enumerate(prompts)])
    assert abs(kl) > 0.1 and measured["kl_eval"] == pytest.approx(kl, abs=1e-3)
    gold = [hacking.gold_reward(chat.parse_completion(tok, out.tokens[b, :out.lengths[b]]).answer, item["reference"])
            for b, item in enumerate(held.items)]
    assert measured["gold_eval"] == pytest.approx(np.mean(gold))

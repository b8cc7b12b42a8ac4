"""RL and preference math (lm.train.rl_math) against hand-computed values and independent numpy float64 references."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.train import rl_math

# A ragged response mask: right padding, left padding, a gap (two assistant turns), a full row and an empty row.
RAGGED = np.array([
    [1, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 1, 1],
    [1, 1, 0, 0, 1, 0],
    [1, 1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 0],
], dtype=np.float32)


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------


def test_grpo_advantages_hand_computed():
    rewards = jnp.array([1, 0, 1, 0, 0, 0, 0, 3, 0.7, 0.7, 0.7, 0.7], jnp.float32)
    # Group 1: mean .5, sample std sqrt(1/3) -> +-0.5 * sqrt(3). Group 2: mean .75, sample std 1.5. Group 3: all equal.
    expected = [0.5 * math.sqrt(3), -0.5 * math.sqrt(3)] * 2 + [-0.5, -0.5, -0.5, 1.5] + [0.0] * 4
    got = jax.jit(rl_math.grpo_advantages, static_argnums=1)(rewards, 4, 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # eps enters as std + eps.
    np.testing.assert_allclose(rl_math.grpo_advantages(rewards, 4, 0.5)[4:8], [-0.75 / 2, -0.75 / 2, -0.75 / 2, 1.125],
                               rtol=1e-6)


def test_dr_grpo_advantages_are_mean_only():
    rewards = jnp.array([1, 0, 1, 0, 0, 0, 0, 3, 0.7, 0.7, 0.7, 0.7], jnp.float32)
    got = jax.jit(rl_math.dr_grpo_advantages, static_argnums=1)(rewards, 4)
    np.testing.assert_allclose(got, [0.5, -0.5, 0.5, -0.5, -0.75, -0.75, -0.75, 2.25, 0, 0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_degenerate_groups_give_exact_zeros(name):
    advantages = rl_math.ADVANTAGES[name]
    # Single-sample groups: nothing to compare against.
    single = advantages(jnp.array([1.0, 0.3, -2.0]), 1)
    np.testing.assert_array_equal(single, np.zeros(3))
    # All-equal groups whose float32 mean is not the value itself (0.1 * 3 / 3 rounds): still exactly 0, not NaN
    # and not rounding error over rounding error.
    for value in (0.1, 0.7, 1e6 + 0.1):
        same = advantages(jnp.full((6,), value, jnp.float32), 3)
        np.testing.assert_array_equal(same, np.zeros(6))


def test_grpo_advantages_match_numpy_and_groups_are_independent():
    rewards = _random(32, seed=0)
    reference = []
    for group in rewards.astype(np.float64).reshape(-1, 8):
        reference += list((group - group.mean()) / (group.std(ddof=1) + 1e-6))
    np.testing.assert_allclose(rl_math.grpo_advantages(jnp.asarray(rewards), 8), reference, rtol=1e-5, atol=1e-6)
    changed = rewards.copy()
    changed[8:] += 5.0 * np.arange(24)
    np.testing.assert_array_equal(rl_math.grpo_advantages(jnp.asarray(changed), 8)[:8],
                                  rl_math.grpo_advantages(jnp.asarray(rewards), 8)[:8])


def test_grpo_advantages_reject_ragged_groups_and_propagate_nan():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        rl_math.grpo_advantages(jnp.zeros(6), 4)
    got = rl_math.grpo_advantages(jnp.array([1.0, jnp.nan, 0.0, 1.0]), 2)
    assert np.isnan(got[:2]).all() and np.isfinite(got[2:]).all()


def _gae_reference(rewards, values, mask, gamma, lam):
    """Plain double loop in float64 over each row's response tokens, in order (gaps and padding skipped)."""
    rewards, values = rewards.astype(np.float64), values.astype(np.float64)
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(positions):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t]
            advantages[b, t] = next_advantage
    return advantages, np.where(mask > 0, advantages + values, 0.0)


def test_gae_hand_computed():
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.full((1, 3), 0.5)
    mask = jnp.ones((1, 3))
    # gamma = lam = 1: A_t = (sum of rewards to go) - V_t.
    advantages, returns = rl_math.gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(advantages, [[0.5, 0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[1.0, 1.0, 1.0]], rtol=1e-6)
    # gamma .9, lam .5: deltas (-.05, -.05, .5); A2 = .5, A1 = -.05 + .45 * .5, A0 = -.05 + .45 * A1.
    advantages, _ = rl_math.gae(rewards, values, mask, 0.9, 0.5)
    np.testing.assert_allclose(advantages, [[-0.05 + 0.45 * 0.175, 0.175, 0.5]], rtol=1e-5)


def test_gae_scan_matches_double_loop_on_padded_rows():
    rewards, values = _random(RAGGED.shape, 1), _random(RAGGED.shape, 2)
    rewards_with_garbage = np.where(RAGGED > 0, rewards, np.inf)  # padding content must not matter
    gae = jax.jit(rl_math.gae)
    advantages, returns = gae(rewards_with_garbage, values, RAGGED.astype(bool), 0.97, 0.9)
    expected_advantages, expected_returns = _gae_reference(rewards, values, RAGGED, 0.97, 0.9)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-6)
    assert not np.asarray(advantages)[4].any()  # the empty row


def test_gae_left_and_right_padding_agree():
    rewards, values = _random((2, 4), 3), _random((2, 4), 4)
    right = np.pad(np.ones((2, 4)), ((0, 0), (0, 3)))
    left = np.pad(np.ones((2, 4)), ((0, 0), (3, 0)))
    a_right, _ = rl_math.gae(np.pad(rewards, ((0, 0), (0, 3))), np.pad(values, ((0, 0), (0, 3))), right, 0.99, 0.95)
    a_left, _ = rl_math.gae(np.pad(rewards, ((0, 0), (3, 0))), np.pad(values, ((0, 0), (3, 0))), left, 0.99, 0.95)
    np.testing.assert_allclose(np.asarray(a_right)[:, :4], np.asarray(a_left)[:, 3:], rtol=1e-6)


def test_whiten():
    x = _random(RAGGED.shape, 5) * 3.0 + 2.0
    keep = RAGGED > 0
    white = np.asarray(rl_math.whiten(x, RAGGED))
    assert abs(white[keep].mean()) < 1e-5 and abs(white[keep].std() - 1.0) < 1e-5
    assert not white[~keep].any()
    np.testing.assert_allclose(white[keep], (x[keep] - x[keep].mean()) / x[keep].std(), rtol=1e-4, atol=1e-5)
    kept_mean = np.asarray(rl_math.whiten(x, RAGGED, shift_mean=False))
    np.testing.assert_allclose(kept_mean[keep].mean(), x[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(kept_mean[keep].std(), 1.0, rtol=1e-5)


def test_registries_name_the_functions():
    assert rl_math.ADVANTAGES == {"gae": rl_math.gae, "grpo": rl_math.grpo_advantages,
                                  "dr_grpo": rl_math.dr_grpo_advantages}
    assert set(rl_math.AGGREGATIONS) == {"token_mean", "sequence_mean", "sequence_sum_norm"}
    assert set(rl_math.KL_ESTIMATORS) == {"k1", "k2", "k3"}


# ---------------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------------


def test_kl_estimators_against_numpy():
    logp, logp_ref = _random((4, 7), 6) - 2.0, _random((4, 7), 7) - 2.0
    d = logp_ref.astype(np.float64) - logp.astype(np.float64)
    np.testing.assert_allclose(rl_math.kl_k1(logp, logp_ref), -d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rl_math.kl_k2(logp, logp_ref), 0.5 * d ** 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rl_math.kl_k3(logp, logp_ref), np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
    # Near d = 0, k3 ~ d^2 / 2 = 5e-9 survives to ~0.1% (exp(d) - 1 - d in float32 rounds it to 0 or to ~1e-7).
    tiny = np.float32(1e-4)
    np.testing.assert_allclose(rl_math.kl_k3(jnp.float32(0.0), tiny), np.expm1(np.float64(tiny)) - tiny, rtol=1e-2)


def test_k3_is_non_negative():
    rng = np.random.default_rng(8)
    logp = np.concatenate([rng.normal(size=5000) * 10, rng.normal(size=5000) * 1e-3]).astype(np.float32)
    logp_ref = logp + np.concatenate([rng.normal(size=5000) * 10, rng.normal(size=5000) * 1e-6]).astype(np.float32)
    assert (np.asarray(rl_math.kl_k3(logp, logp_ref)) >= 0).all()
    assert (np.asarray(rl_math.kl_k2(logp, logp_ref)) >= 0).all()


def test_approx_kl_is_half_mean_squared_log_ratio():
    logp, logp_old = _random(RAGGED.shape, 9), _random(RAGGED.shape, 10)
    keep = RAGGED > 0
    expected = 0.5 * np.mean((logp[keep].astype(np.float64) - logp_old[keep]) ** 2)
    np.testing.assert_allclose(jax.jit(rl_math.approx_kl)(logp, logp_old, RAGGED), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, policy loss, value loss, entropy
# ---------------------------------------------------------------------------------------------------------------


def _aggregate_reference(x, mask, name, max_len=None):
    x = x.astype(np.float64)
    rows = [x[b][mask[b] > 0] for b in range(len(x))]
    if name == "token_mean":
        return np.concatenate(rows).mean()
    if name == "sequence_mean":
        return np.mean([row.mean() for row in rows if len(row)])
    return np.mean([row.sum() / (max_len or x.shape[1]) for row in rows])


@pytest.mark.parametrize("name,max_len", [("token_mean", None), ("sequence_mean", None),
                                          ("sequence_sum_norm", None), ("sequence_sum_norm", 16)])
def test_aggregations_against_numpy(name, max_len):
    x = _random(RAGGED.shape, 11)
    garbage = np.where(RAGGED > 0, x, np.nan)
    aggregate = jax.jit(rl_math.aggregate, static_argnums=(2, 3))
    np.testing.assert_allclose(aggregate(garbage, RAGGED, name, max_len), _aggregate_reference(x, RAGGED, name, max_len),
                               rtol=1e-5)


def test_aggregations_differ_as_designed():
    # One long and one short answer: token_mean weighs tokens, sequence_mean weighs answers.
    x = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(rl_math.aggregate(x, mask, "token_mean"), 7 / 5)
    np.testing.assert_allclose(rl_math.aggregate(x, mask, "sequence_mean"), 2.0)
    np.testing.assert_allclose(rl_math.aggregate(x, mask, "sequence_sum_norm"), (4 / 4 + 3 / 4) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        rl_math.aggregate(x, mask, "mean")


RATIOS = np.array([0.5, 0.85, 1.0, 1.1, 1.3, 1.5])


def _clip_case():
    logp_old = np.full((2, 6), -1.0, np.float32)
    logp = (logp_old + np.log(RATIOS)).astype(np.float32)
    advantages = np.array([[1.0] * 6, [-2.0] * 6], np.float32)
    return logp, logp_old, advantages


def test_ppo_clip_loss_hand_computed_with_clip_higher():
    logp, logp_old, advantages = _clip_case()
    mask = np.ones((2, 6), np.float32)
    loss, clip_frac = jax.jit(rl_math.ppo_clip_loss, static_argnums=(4, 5, 6))(logp, logp_old, advantages, mask,
                                                                               0.2, 0.28, "token_mean")
    # A = +1: ratios 1.3 and 1.5 clip to 1.28; 0.5 stays (the pessimistic bound is the unclipped one).
    positive = [-0.5, -0.85, -1.0, -1.1, -1.28, -1.28]
    # A = -2: ratio 0.5 clips to 0.8; ratios above 1.28 stay unclipped (pessimistic again).
    negative = [1.6, 1.7, 2.0, 2.2, 2.6, 3.0]
    np.testing.assert_allclose(loss, np.mean(positive + negative), rtol=1e-5)
    np.testing.assert_allclose(clip_frac, 3 / 12, rtol=1e-6)


def _ppo_reference(logp, logp_old, advantages, eps_low, eps_high):
    ratio = np.exp(logp.astype(np.float64) - logp_old)
    unclipped, clipped = -advantages * ratio, -advantages * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    return np.maximum(unclipped, clipped), clipped > unclipped


@pytest.mark.parametrize("aggregation", sorted(rl_math.AGGREGATIONS))
def test_ppo_clip_loss_against_numpy_on_ragged_mask(aggregation):
    logp_old = _random(RAGGED.shape, 12) - 1.0
    logp = logp_old + 0.4 * _random(RAGGED.shape, 13)
    advantages = _random(RAGGED.shape, 14)
    per_token, clipped = _ppo_reference(logp, logp_old, advantages, 0.1, 0.3)
    loss, clip_frac = rl_math.ppo_clip_loss(logp, logp_old, advantages, RAGGED, 0.1, 0.3, aggregation)
    np.testing.assert_allclose(loss, _aggregate_reference(per_token, RAGGED, aggregation), rtol=1e-5)
    keep = RAGGED > 0
    assert 0 < clipped[keep].mean() < 1
    np.testing.assert_allclose(clip_frac, clipped[keep].mean(), rtol=1e-6)


def test_ppo_clip_loss_broadcasts_sequence_advantages():
    logp_old = _random(RAGGED.shape, 15)
    logp = logp_old + 0.3 * _random(RAGGED.shape, 16)
    advantages = _random(RAGGED.shape[0], 17)
    symmetric = rl_math.ppo_clip_loss(logp, logp_old, advantages, RAGGED, 0.2)
    tokenwise = rl_math.ppo_clip_loss(logp, logp_old, np.repeat(advantages[:, None], 6, 1), RAGGED, 0.2, 0.2)
    np.testing.assert_allclose(symmetric, tokenwise, rtol=1e-6)


def test_ppo_clip_loss_gradient_is_analytic():
    logp, logp_old, advantages = _clip_case()
    mask = np.ones((2, 6), np.float32)
    mask[1, 5] = 0.0
    grad = jax.grad(lambda lp: rl_math.ppo_clip_loss(lp, logp_old, advantages, mask, 0.2, 0.28)[0])(jnp.asarray(logp))
    _, clipped = _ppo_reference(logp, logp_old, advantages, 0.2, 0.28)
    # d/dlogp of -A * exp(logp - logp_old) is -A * ratio on unclipped tokens, 0 on clipped ones, / #tokens.
    expected = np.where(clipped | (mask == 0), 0.0, -advantages * RATIOS) / mask.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_padding_garbage_cannot_poison_the_loss_or_its_gradient():
    logp = np.where(RAGGED > 0, _random(RAGGED.shape, 18), -np.inf).astype(np.float32)
    logp_old = np.where(RAGGED > 0, _random(RAGGED.shape, 19), np.inf).astype(np.float32)
    advantages = np.where(RAGGED > 0, 1.0, np.nan).astype(np.float32)
    value, grad = jax.value_and_grad(lambda lp: rl_math.ppo_clip_loss(lp, logp_old, advantages, RAGGED)[0])(logp)
    assert np.isfinite(value) and np.isfinite(grad).all()


def test_clipped_value_loss_against_numpy():
    old_values = _random(RAGGED.shape, 20)
    values = old_values + 0.5 * _random(RAGGED.shape, 21)
    returns = _random(RAGGED.shape, 22)
    clip = 0.2
    v = values.astype(np.float64)
    v_clipped = old_values + np.clip(v - old_values, -clip, clip)
    unclipped, clipped = (v - returns) ** 2, (v_clipped - returns) ** 2
    keep = RAGGED > 0
    loss, clip_frac = jax.jit(rl_math.clipped_value_loss, static_argnums=(4, 5))(values, old_values, returns, RAGGED,
                                                                                  clip, "token_mean")
    np.testing.assert_allclose(loss, 0.5 * np.maximum(unclipped, clipped)[keep].mean(), rtol=1e-5)
    assert 0 < (clipped > unclipped)[keep].mean() < 1
    np.testing.assert_allclose(clip_frac, (clipped > unclipped)[keep].mean(), rtol=1e-6)


def test_entropy_from_logits():
    logits = _random((5, 6, 11), 23) * 2.0
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    per_token = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(rl_math.entropy_from_logits(logits, RAGGED), per_token[RAGGED > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(rl_math.token_entropy(jnp.zeros((3, 7))), np.full(3, np.log(7)), rtol=1e-6)


def test_explained_variance():
    returns = _random(RAGGED.shape, 24)
    values = returns + 0.5 * _random(RAGGED.shape, 25)
    keep = RAGGED > 0
    expected = 1 - np.var(returns[keep] - values[keep]) / np.var(returns[keep])
    np.testing.assert_allclose(rl_math.explained_variance(values, returns, RAGGED), expected, rtol=1e-5)
    np.testing.assert_allclose(rl_math.explained_variance(returns, returns, RAGGED), 1.0)
    assert np.isnan(rl_math.explained_variance(values, np.ones_like(returns), RAGGED))


# ---------------------------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------------------------


def test_bradley_terry_closed_form_with_margin_and_centering():
    r_chosen, r_rejected = jnp.array([2.0, 0.0, 1.0]), jnp.array([1.0, 0.0, 3.0])
    loss, metrics = jax.jit(rl_math.bradley_terry_loss)(r_chosen, r_rejected, 0.5, 0.1)
    # -log sigmoid(x) = log(1 + exp(-x)) for the differences 1, 0, -2 less the margin .5; centring on sums 3, 0, 4.
    expected = np.mean([math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5)), math.log1p(math.exp(2.5))])
    expected += 0.1 * np.mean([9.0, 0.0, 16.0])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], (1 + 0.5 + 0) / 3)  # the tie counts half
    np.testing.assert_allclose(metrics["margin"], -1 / 3, rtol=1e-6)
    plain, _ = rl_math.bradley_terry_loss(r_chosen, r_rejected)
    np.testing.assert_allclose(plain, np.mean([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(2))]),
                               rtol=1e-6)


def test_bradley_terry_per_pair_margin():
    r_chosen, r_rejected = jnp.array([2.0, 1.0]), jnp.array([1.0, 1.0])
    loss, _ = rl_math.bradley_terry_loss(r_chosen, r_rejected, jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(loss, np.mean([math.log(2), math.log1p(math.exp(-1))]), rtol=1e-6)


def _dpo_reference(pc, pr, rc, rr, beta, smoothing):
    z = beta * ((pc - rc) - (pr - rr)).astype(np.float64)
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    return np.mean(-(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_loss_against_reference(smoothing):
    pc, pr, rc, rr = (_random(8, seed) * 5 - 40 for seed in (26, 27, 28, 29))
    loss, metrics = jax.jit(rl_math.dpo_loss)(pc, pr, rc, rr, 0.1, smoothing)
    np.testing.assert_allclose(loss, _dpo_reference(pc, pr, rc, rr, 0.1, smoothing), rtol=1e-5)
    reward_chosen, reward_rejected = 0.1 * (pc - rc), 0.1 * (pr - rr)
    np.testing.assert_allclose(metrics["reward_chosen"], reward_chosen.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_rejected"], reward_rejected.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_margin"], (reward_chosen - reward_rejected).mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_accuracy"], (reward_chosen > reward_rejected).mean())


def test_dpo_at_the_reference_is_log_two_and_chance():
    logps = jnp.array([-12.0, -30.0])
    loss, metrics = rl_math.dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert float(metrics["reward_accuracy"]) == 0.5 and float(metrics["reward_margin"]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# RLHF rewards and KL control
# ---------------------------------------------------------------------------------------------------------------


def test_best_of_n_kl():
    np.testing.assert_allclose(rl_math.best_of_n_kl(1), 0.0, atol=1e-7)
    np.testing.assert_allclose(rl_math.best_of_n_kl(jnp.array([2, 16])), [math.log(2) - 0.5, math.log(16) - 15 / 16],
                               rtol=1e-6)


def test_ppo_token_rewards_hand_computed():
    kl = np.array([[0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 0.5, 0.5], [9.0, 9.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    rewards = rl_math.ppo_token_rewards(jnp.array([2.0, 1.0, 7.0]), kl, mask, 0.1, no_eos_penalty=3.0,
                                        ended=jnp.array([True, False, True]))
    np.testing.assert_allclose(rewards, [[-0.01, -0.02, -0.03 + 2.0, 0.0],
                                         [-0.05, -0.05, -0.05, -0.05 + 1.0 - 3.0],
                                         [0.0, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_ppo_token_rewards_invariant_to_padding_side():
    score, kl = _random(3, 30), np.abs(_random((3, 5), 31))
    lengths = [5, 2, 4]
    right = np.zeros((3, 8), np.float32)
    left = np.zeros((3, 8), np.float32)
    kl_right, kl_left = np.full((3, 8), 7.0, np.float32), np.full((3, 8), 7.0, np.float32)
    for b, n in enumerate(lengths):
        right[b, :n], left[b, 8 - n:] = 1, 1
        kl_right[b, :n], kl_left[b, 8 - n:] = kl[b, :n], kl[b, :n]
    ended = jnp.array([True, False, False])
    token_rewards = jax.jit(rl_math.ppo_token_rewards)
    from_right = np.asarray(token_rewards(score, kl_right, right, 0.05, 1.5, ended))
    from_left = np.asarray(token_rewards(score, kl_left, left, 0.05, 1.5, ended))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(from_right[b, :n], from_left[b, 8 - n:], rtol=1e-6)
        expected = -0.05 * kl[b, :n]
        expected[-1] += score[b] - (0.0 if b == 0 else 1.5)
        np.testing.assert_allclose(from_right[b, :n], expected, rtol=1e-5)
    assert not from_right[right == 0].any() and not from_left[left == 0].any()


def test_adaptive_kl():
    beta = 0.1
    # KL 8 vs target 6: error 1/3 clipped to .2; 256 samples over a 10k horizon.
    np.testing.assert_allclose(rl_math.adaptive_kl(beta, 8.0, 6.0, 10000, 256), 0.1 * (1 + 0.2 * 0.0256), rtol=1e-6)
    np.testing.assert_allclose(rl_math.adaptive_kl(beta, 5.4, 6.0, 10000, 256), 0.1 * (1 - 0.1 * 0.0256), rtol=1e-6)
    np.testing.assert_allclose(rl_math.adaptive_kl(beta, 6.0, 6.0, 10000, 256), 0.1, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(rl_math.adaptive_kl)(beta, 0.0, 6.0, 10000, 256), 0.1 * (1 - 0.2 * 0.0256),
                               rtol=1e-6)

"""RL and preference math as small pure JAX functions (issues #15 RLHF and #16 GRPO).

Trainers wire rollout -> reward -> advantage -> loss through these; nothing here knows about models, batches or
optimizers. Every function is jit-able (`group_size` and `aggregation` / `max_len` are static where given).

Conventions:
- `mask` is a float or bool [B, T] array marking response tokens (1 / True); everything else (prompt, padding,
  tokens after the end) is ignored, whatever garbage it holds: masked positions are selected away with `jnp.where`
  before any exp or product, so a -inf log-prob in padding cannot turn a loss or its gradient into NaN.
- Per-token inputs (log-probs, values, rewards, KL) are [B, T] float; sequence-level ones (scores, group rewards,
  sequence log-probs) are [B].
- Losses are to be minimised and are returned as float32 scalars; functions that report more than a loss return
  `(loss, metrics)` where metrics is a dict of float32 scalars.

Registries (a config picks by name): ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS.
"""
import jax
import jax.numpy as jnp

from lm.model import reductions

# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def _bool(mask):
    return jnp.asarray(mask).astype(bool)


def masked_sum(x, mask, axis=None):
    """Sum of `x` over the positions where `mask` is set (masked positions may hold inf / NaN)."""
    return jnp.sum(jnp.where(_bool(mask), x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of `x` over the masked positions; 0 where there are none."""
    count = jnp.sum(_bool(mask), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x, mask):
    """Population variance (ddof=0) of `x` over the masked positions; 0 where there are none."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """Masked mean 0 / std 1 of `x` (population std, ddof=0, so the masked std of the result is exactly 1 up to eps);
    `shift_mean=False` keeps the original mean (only rescales). Masked positions come back as 0."""
    mean = masked_mean(x, mask)
    white = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(_bool(mask), white, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised Advantage Estimation over the response tokens: (advantages [B, T], returns [B, T]).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where t+1 is the next *response*
    token of the row (masked positions in between are skipped, so left padding, right padding and gaps all work) and
    V = 0, A = 0 after the row's last response token. returns = advantages + values. Both are 0 at masked positions.
    Not whitened: call `whiten(advantages, mask)` if the trainer wants that (PPO usually does).
    """
    keep = _bool(mask)
    rewards = jnp.where(keep, rewards, 0.0).astype(jnp.float32)
    values = jnp.where(keep, values, 0.0).astype(jnp.float32)

    def step(carry, xs):
        next_advantage, next_value = carry
        reward, value, on = xs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        # A masked position passes the carry (the next response token's A and V) through unchanged.
        carry = (jnp.where(on, advantage, next_advantage), jnp.where(on, value, next_value))
        return carry, jnp.where(on, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, keep.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(keep, advantages + values, 0.0)


def _groups(rewards, group_size: int):
    """rewards [N] -> (reward - group mean [N / G, G], whether the group's rewards differ at all [N / G, 1])."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {rewards.shape}")
    grouped = rewards.reshape(-1, group_size)
    # A group whose rewards are all equal (this includes every single-sample group) carries no signal: its
    # advantages are exactly 0, not rounding error divided by rounding error. (`!=` so a NaN reward propagates
    # into its group's advantages instead of being silently zeroed.)
    informative = (jnp.max(grouped, axis=1) != jnp.min(grouped, axis=1))[:, None]
    return grouped - jnp.mean(grouped, axis=1, keepdims=True), informative


def grpo_advantages(rewards, group_size: int, eps: float = 1e-6):
    """GRPO's group z-score: rewards [N] in groups of `group_size` consecutive samples (one prompt's completions)
    -> (r - group mean) / (group std + eps), [N].

    std is the sample std (ddof=1, Bessel-corrected), as torch's `.std()` in DeepSeekMath / TRL and Tunix compute it.
    Groups of one sample and groups whose rewards are all equal get advantage 0 (never NaN).
    """
    centred, informative = _groups(rewards, group_size)
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group_size - 1, 1))
    return jnp.where(informative, centred / (std + eps), 0.0).reshape(-1)


def dr_grpo_advantages(rewards, group_size: int):
    """Dr. GRPO (Liu et al. 2025): r - group mean with no std division, [N]; all-equal groups give exactly 0."""
    centred, informative = _groups(rewards, group_size)
    return jnp.where(informative, centred, 0.0).reshape(-1)


ADVANTAGES = {"gae": gae, "grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages}

# ----------------------------------------------------------------------------------------------------------------
# KL between the policy and the reference, per token (Schulman, "Approximating KL divergence", 2020)
# ----------------------------------------------------------------------------------------------------------------


def kl_k1(logp, logp_ref):
    """k1 = logp - logp_ref: unbiased for KL(policy || ref) under policy samples, per token can be negative."""
    return logp - logp_ref


def kl_k2(logp, logp_ref):
    """k2 = 0.5 (logp - logp_ref)^2: biased, low variance, >= 0."""
    return 0.5 * jnp.square(logp - logp_ref)


def kl_k3(logp, logp_ref):
    """k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1: unbiased, low variance, >= 0 (GRPO's KL term).

    expm1(d) - d keeps the d^2/2 near d = 0 that exp(d) - 1 - d loses to cancellation; it is >= 0 in floating point
    because expm1 rounds monotonically and expm1(d) >= d exactly.
    """
    d = logp_ref - logp
    return jnp.expm1(d) - d


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def approx_kl(logp, logp_old, mask):
    """PPO's reported approximate KL between the rollout policy and the current one: 0.5 * masked mean of
    (logp - logp_old)^2 (OpenAI baselines ppo2 'approxkl', TRL 'policy/approxkl_avg')."""
    return masked_mean(kl_k2(logp, logp_old), mask)


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregation over response tokens
# ----------------------------------------------------------------------------------------------------------------


def token_mean(x, mask, max_len=None):
    """DAPO: sum over all response tokens of the batch / their number (long answers weigh more)."""
    return masked_mean(x, mask)


def sequence_mean(x, mask, max_len=None):
    """GRPO's original: mean over each sequence's tokens, then mean over the sequences that have any token (an empty
    row, e.g. a padding row, leaves the denominator rather than diluting the loss)."""
    per_sequence = masked_mean(x, mask, axis=1)
    has_tokens = jnp.any(_bool(mask), axis=1)
    return masked_mean(per_sequence, has_tokens)


def sequence_sum_norm(x, mask, max_len=None):
    """Dr. GRPO: sum over each sequence's tokens / a constant `max_len` (default T, the padded length), then mean over
    all B rows; no length bias from per-sequence normalisation."""
    max_len = x.shape[-1] if max_len is None else max_len
    return jnp.mean(masked_sum(x, mask, axis=1)) / max_len


AGGREGATIONS = {"token_mean": token_mean, "sequence_mean": sequence_mean, "sequence_sum_norm": sequence_sum_norm}


def aggregate(x, mask, aggregation: str = "token_mean", max_len=None):
    """Reduce per-token values [B, T] to a scalar with the named aggregation (see AGGREGATIONS)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[aggregation](x.astype(jnp.float32), mask, max_len)


# ----------------------------------------------------------------------------------------------------------------
# Policy, value and entropy terms
# ----------------------------------------------------------------------------------------------------------------


def ppo_clip_terms(logp, logp_old, advantages, mask, eps_low: float = 0.2, eps_high: float | None = None):
    """PPO's clipped surrogate per token, with DAPO's decoupled clip range: (terms, clipped), both [B, T].

    ratio = exp(logp - logp_old); terms = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)), 0 off the
    mask. `eps_high=None` means eps_low (symmetric PPO). advantages are [B, T] (PPO/GAE) or [B] (GRPO, broadcast over
    tokens). clipped: where the clipped term is the active one, i.e. the token gets no gradient.
    """
    eps_high = eps_low if eps_high is None else eps_high
    keep = _bool(mask)
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jnp.where(keep, advantages, 0.0)
    ratio = jnp.exp(jnp.where(keep, logp - logp_old, 0.0).astype(jnp.float32))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


def ppo_clip_loss(logp, logp_old, advantages, mask, eps_low: float = 0.2, eps_high: float | None = None,
                  aggregation: str = "token_mean", max_len=None):
    """`ppo_clip_terms` aggregated by name: (loss, clip_frac), clip_frac the fraction of response tokens (token
    mean) where the clip is active."""
    terms, clipped = ppo_clip_terms(logp, logp_old, advantages, mask, eps_low, eps_high)
    return aggregate(terms, mask, aggregation, max_len), masked_mean(clipped.astype(jnp.float32), mask)


def clipped_value_loss(values, old_values, returns, mask, clip_eps: float, aggregation: str = "token_mean",
                       max_len=None):
    """PPO's clipped value loss: (loss, clip_frac) with loss = aggregate(0.5 * max((V - R)^2, (V_clip - R)^2)) and
    V_clip = old_values + clip(V - old_values, -clip_eps, clip_eps); clip_frac = token fraction where the clipped
    error is the larger."""
    keep = _bool(mask)
    values, old_values, returns = (jnp.where(keep, v, 0.0).astype(jnp.float32) for v in (values, old_values, returns))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_error = jnp.square(values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    loss = aggregate(0.5 * jnp.maximum(unclipped_error, clipped_error), mask, aggregation, max_len)
    return loss, masked_mean((clipped_error > unclipped_error).astype(jnp.float32), mask)


def token_entropy(logits):
    """Entropy of softmax(logits) per position, [..., V] -> float32 [...], in nats."""
    logits = logits.astype(jnp.float32)
    return reductions.logsumexp(logits) - reductions.row_sum(reductions.softmax(logits) * logits)


def entropy_from_logits(logits, mask):
    """Masked token mean of the per-token entropy of logits [B, T, V]."""
    return masked_mean(token_entropy(logits), mask)


def explained_variance(values, returns, mask):
    """1 - Var[returns - values] / Var[returns] over the masked tokens (1 = perfect critic, 0 = no better than a
    constant, < 0 worse); NaN when the returns have no variance (undefined, as in OpenAI baselines)."""
    var_returns = masked_var(returns, mask)
    return jnp.where(var_returns > 0, 1.0 - masked_var(returns - values, mask) / var_returns, jnp.nan)


# ----------------------------------------------------------------------------------------------------------------
# Preference losses: reward model (Bradley-Terry) and DPO
# ----------------------------------------------------------------------------------------------------------------


def pairwise_accuracy(chosen, rejected):
    """Fraction of pairs with chosen > rejected; a tie counts one half (a constant scorer, e.g. DPO at step 0 where
    the policy is the reference, scores chance: 0.5)."""
    return jnp.mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)))


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef: float = 0.0):
    """Reward-model loss on pairs [B]: (loss, {"accuracy", "margin"}).

    loss = mean(-log sigmoid(r_chosen - r_rejected - margin)) + center_coef * mean((r_chosen + r_rejected)^2):
    `margin` (scalar or [B]) asks chosen to win by at least that much (Llama 2); the centring term pins the reward's
    free offset near 0 (Eisenstein et al. 2023; TRL's center_rewards_coefficient). metrics: pairwise accuracy and
    the mean reward margin r_chosen - r_rejected.
    """
    r_chosen, r_rejected = r_chosen.astype(jnp.float32), r_rejected.astype(jnp.float32)
    difference = r_chosen - r_rejected
    loss = -jnp.mean(jax.nn.log_sigmoid(difference - margin))
    loss = loss + center_coef * jnp.mean(jnp.square(r_chosen + r_rejected))
    return loss, {"accuracy": pairwise_accuracy(r_chosen, r_rejected), "margin": jnp.mean(difference)}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023) from summed sequence log-probs [B]: (loss, metrics).

    implicit reward r = beta * (log pi - log pi_ref); z = r_chosen - r_rejected;
    loss = mean(-(1 - ls) log sigmoid(z) - ls log sigmoid(-z)): `label_smoothing` ls is cDPO's probability that a
    label is flipped (0 = plain DPO). metrics: reward_chosen / reward_rejected (means), reward_margin (mean z),
    reward_accuracy (pairwise accuracy of the implicit rewards).
    """
    reward_chosen = beta * (policy_chosen - ref_chosen).astype(jnp.float32)
    reward_rejected = beta * (policy_rejected - ref_rejected).astype(jnp.float32)
    z = reward_chosen - reward_rejected
    loss = -jnp.mean((1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z))
    return loss, {
        "reward_chosen": jnp.mean(reward_chosen), "reward_rejected": jnp.mean(reward_rejected),
        "reward_margin": jnp.mean(z), "reward_accuracy": pairwise_accuracy(reward_chosen, reward_rejected),
    }


# ----------------------------------------------------------------------------------------------------------------
# Rewards and KL control for PPO-RLHF
# ----------------------------------------------------------------------------------------------------------------


def best_of_n_kl(n):
    """Analytic KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022's x-axis)."""
    n = jnp.asarray(n, jnp.float32)
    return jnp.log(n) - (n - 1.0) / n


def last_token_one_hot(mask):
    """[B, T] float32 with a 1 at each row's last response token (from the mask, so any padding side works); a row
    with no response tokens is all 0."""
    keep = _bool(mask)
    length = keep.shape[1]
    last = length - 1 - jnp.argmax(keep[:, ::-1], axis=1)
    return jax.nn.one_hot(last, length, dtype=jnp.float32) * jnp.any(keep, axis=1, keepdims=True)


def ppo_token_rewards(score, kl, mask, beta, no_eos_penalty: float = 0.0, ended=None):
    """Per-token PPO-RLHF rewards [B, T] (Ziegler et al. 2019; Stiennon et al. 2020):
    -beta * kl on every response token, plus the sequence score at its last response token, less `no_eos_penalty`
    where `ended` [B] (bool: the answer emitted the end token) is False. `ended=None` means every answer ended.
    Masked positions are 0.
    """
    score = jnp.asarray(score, jnp.float32)
    if ended is not None:
        score = score - no_eos_penalty * (1.0 - _bool(ended).astype(jnp.float32))
    rewards = jnp.where(_bool(mask), -beta * kl, 0.0)
    return rewards + score[:, None] * last_token_one_hot(mask)


def adaptive_kl(beta, observed_kl, target: float, horizon: float, n_steps):
    """Ziegler et al. 2019's adaptive KL coefficient, one update: e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_steps / horizon), where n_steps counts the samples (or steps) since the last update."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / horizon)

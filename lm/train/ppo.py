"""PPO-RLHF: the SFT policy trained against the reward model with a KL penalty to the frozen SFT reference
(Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022); writes <workdir>/ppo/.

    python -m lm.train --config=configs/ppo_tiny.py --workdir=W        # W/sft/ + W/reward/ -> W/ppo/

Roles (one program, no weight copies):
- policy + value: ONE TransformerWithScalarHead, its trunk and LM head from the SFT checkpoint and its scalar head
  (the value) fresh. A shared trunk because the Trainer owns one model and one optimizer state: one forward pass
  gives the logits and the values, and there is no second set of trunk weights and Adam moments to keep. The price
  is that the value loss shapes the policy's features; `vf_coef` weighs it (0.1 by default). A separate critic
  would need a second Trainer state.
- rollout: lm.sample.generate_ids with the policy's live parameters (`current_model()`, valid until the next step).
- reference: the frozen SFT parameters; reference log-probs of the sampled tokens are computed in the batch source.
- reward: the frozen reward model (W/reward), its score read at each answer's last real token and normalised by the
  reward run's mean and std.

One rollout: `rollout_batch` prompts (a seeded permutation of the prompt pool per epoch) are answered (temperature
`temperature`, stop at <|assistant_end|>); the reference and the reward model score the same token rows (prompts
left-padded to the pool's longest prompt, positions -1 on padding) in one jitted program, which also computes the
rewards, GAE and whitening (`_score`). The old-policy log-probs and values are the sampler's own (the same tokens
from the same parameters; generate_ids(values=True) reads the value head at the states the decode computes anyway),
so the policy's trunk does not run in scoring; the reference's LM head and softmax run only on the answer columns,
and the reward model's last block (past its keys and values) and head only at each answer's last token
(Transformer.hidden_at). Per-token
reward = -kl_coef * k1 (log pi - log pi_ref) on every answer token, plus the score at the last one, less
`no_eos_penalty` for an answer that never emitted <|assistant_end|> (rl_math.ppo_token_rewards); GAE (gamma, lam);
advantages whitened over the rollout. Then `epochs` passes over `minibatches` minibatches (a seeded permutation per
(rollout, epoch)), one optimizer update each: clipped policy loss + vf_coef * clipped value loss - entropy_coef *
entropy, token-mean. The KL coefficient is fixed, or adaptive (kl_target > 0: rl_math.adaptive_kl after every rollout).

Metrics: every update logs its own (policy_loss, value_loss, entropy, clip_frac, value_clip_frac, approx_kl) and its
rollout's (rollout/score, rollout/score_raw, rollout/kl (k1 summed over an answer, mean over answers: the KL of the
answer distribution), rollout/kl_k3, rollout/kl_coef, rollout/response_length, rollout/end_rate,
rollout/value_explained_variance, and every `drift_every`-th rollout (rollout 0 included) rollout/logprob_diff: the
largest |sampler log-prob - trainer log-prob| of the same tokens with the same parameters, ~1e-6; a drift is a bug,
and since the sampler's log-probs are the old-policy log-probs, one the PPO ratio would inherit; rollout/value_diff
likewise for the values).
<run>/samples/<rollout>.json keeps a few answers.

Resume is bit-exact: rollout r is a pure function of (seed, r) and the parameters at its start (its prompts and its
sampling key are derived from them), checkpoints are only taken at rollout boundaries (checkpoint_every must be a
multiple of epochs * minibatches), and the KL coefficient for the next rollout is saved in the checkpoint meta
("ppo": {"kl_coef"}). A run killed inside a rollout resumes from the boundary before it and redoes that rollout.
"""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import mesh as lm_mesh
from lm import model as lm_model
from lm import sample
from lm.config import ConfigError
from lm.data import pipeline, preferences
from lm.eval import tasks
from lm.tokenizer import chat
from lm.train import loop, reward, rl_math

RUN_DIR = "ppo"


# --- prompts -------------------------------------------------------------------------------------------------------

def prompt_pool(ppo_config, tokenizer, seed: int, split: str = "train") -> tuple[list[dict], dict]:
    """([{"ids", "messages", "reference"}], stats): the prompts rollouts draw from. `ppo.prompts` is "synthetic"
    (arithmetic prompts of `split`, `n_prompts` of them) or preference files (their prompts). Prompts longer than
    `max_prompt_tokens` are dropped and counted."""
    source = ppo_config.get("prompts", "synthetic")
    if source == "synthetic":
        examples = tasks.Arithmetic().examples(split, n=int(ppo_config.get("n_prompts", 256)), seed=seed)
        items = [(e.prompt, e.reference) for e in examples]
        stats = dict(source="synthetic", read=len(items))
    else:
        pairs, read = preferences.load_pairs([source] if isinstance(source, str) else list(source))
        seen, items = set(), []
        for pair in pairs:
            key = json.dumps(pair.prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                items.append((pair.prompt, None))
        stats = dict(source=str(source), read=len(items), file_rejected=read.rejected)
    limit = int(ppo_config.get("max_prompt_tokens", 64))
    pool = []
    for messages, reference in items:
        ids = chat.render_for_completion(tokenizer, messages)
        if len(ids) <= limit:
            pool.append(dict(ids=ids, messages=messages, reference=reference))
    stats.update(kept=len(pool), dropped_too_long=len(items) - len(pool))
    if not pool:
        raise ConfigError(f"config.ppo.prompts={source!r}: no prompt fits config.ppo.max_prompt_tokens={limit}")
    return pool, stats


# --- the rollout's scoring pass ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("defs", "first", "whiten", "check_drift"))
def _score(states, tokens, positions, mask, sampler_logprobs, sampler_values, lengths, ended, coefs, *, defs, first,
           whiten, check_drift):
    """The whole scoring of a rollout in one program: reference log-probs, reward score, KL, per-token rewards,
    GAE, whitening. The old-policy log-probs and values are the sampler's (the same tokens from the same
    parameters: generate_ids(values=True) reads the value head at the states it chose each token from), so the
    policy's trunk does not run here; with `check_drift` it does, with its LM head, and `drift` is the largest
    |sampler - trainer| log-prob and `value_drift` the largest |sampler - trainer| value.

    Only what is needed is computed: the reference's trunk runs over the full rows (an answer token attends to its
    prompt), but its LM head and vocabulary softmax only over the answer columns (from target column first - 1, as
    GRPO's `completion_start`), and the reward model's last block and head at each row's last token only
    (hidden_at). Per-token outputs come back over the answer columns [B, M]; `full_width` pads them to the training
    rows."""
    (policy_def, reference_def, reward_def), (policy_state, reference_state, reward_state) = defs, states
    kl_coef, no_eos_penalty, gamma, lam, mean, std = coefs
    inputs, input_positions, start = tokens[:, :-1], positions[:, :-1], first - 1
    targets, mask = tokens[:, 1 + start:], mask[:, start:]
    answer = jnp.broadcast_to(jnp.arange(start, inputs.shape[1]), (inputs.shape[0], inputs.shape[1] - start))
    values = jnp.where(mask > 0, sampler_values, 0.0)
    reference = nnx.merge(reference_def, reference_state)
    reference_logprobs = lm_model.token_logprobs(
        reference.logits(reference.hidden_at(inputs, answer, input_positions)), targets)
    reward_model = nnx.merge(reward_def, reward_state)
    raw = reward_model.scalar_head(reward_model.hidden_at(tokens, (first + lengths - 1)[:, None], positions))[:, 0]
    score = (raw - mean) / jnp.maximum(std, 1e-6)
    logprobs = jnp.where(mask > 0, sampler_logprobs, 0.0)
    k1 = rl_math.kl_k1(logprobs, reference_logprobs)
    rewards = rl_math.ppo_token_rewards(score, k1, mask, kl_coef, no_eos_penalty, ended)
    advantages, returns = rl_math.gae(rewards, values, mask, gamma, lam)
    out = dict(old_logprobs=logprobs, old_values=values, returns=returns,
               advantages=rl_math.whiten(advantages, mask) if whiten else advantages, score=score, raw=raw,
               kl=rl_math.masked_sum(k1, mask, axis=1),
               kl_k3=rl_math.masked_sum(rl_math.kl_k3(logprobs, reference_logprobs), mask, axis=1),
               explained_variance=rl_math.explained_variance(values, returns, mask))
    if check_drift:
        policy = nnx.merge(policy_def, policy_state)
        hidden = policy.hidden_at(inputs, answer, input_positions)  # the last blocks at the answer columns
        live = lm_model.token_logprobs(policy.logits(hidden), targets)
        out["drift"] = jnp.max(jnp.where(mask > 0, jnp.abs(sampler_logprobs - live), 0.0))
        out["value_drift"] = jnp.max(jnp.where(mask > 0, jnp.abs(values - policy.scalar_head(hidden)), 0.0))
    return out


PER_TOKEN = ("old_logprobs", "old_values", "returns", "advantages")


def full_width(answer_columns: np.ndarray, first: int) -> np.ndarray:
    """[B, M] over the answer columns -> [B, first - 1 + M] over the training rows' target columns (0 before)."""
    return np.pad(answer_columns, ((0, 0), (first - 1, 0)))


def rollout_rows(prompts: list, out: sample.TokenOutput, pad: int, P: int):
    """(tokens, positions int32 [B, P + M], answer mask over the targets float32 [B, P + M - 1]): prompts
    left-padded to P columns (a fixed width, so every rollout has the same shapes), then the M answer slots
    (padding after a row's end). The first answer token is column P."""
    prompt_tokens, prompt_positions = sample.left_pad(prompts, P)
    B, M = out.tokens.shape
    answer = np.where(np.arange(M)[None] < out.lengths[:, None], out.tokens, pad).astype(np.int32)
    on = np.arange(M)[None] < out.lengths[:, None]
    answer_positions = np.where(on, np.asarray([len(p) for p in prompts])[:, None] + np.arange(M)[None], -1)
    tokens = np.concatenate([prompt_tokens, answer], axis=1)
    positions = np.concatenate([prompt_positions, answer_positions.astype(np.int32)], axis=1)
    mask = np.zeros((B, P + M - 1), np.float32)
    mask[:, P - 1:] = on
    return tokens, positions, mask


class Rollouts:
    """The on-policy batch source: makes rollout r from the live policy, then yields its minibatches.

    `extra_metrics(pool_items, answers, ended) -> {name: float array [B]}` adds per-answer numbers (e.g. the hacking
    experiment's hidden gold reward), logged as rollout/<name> and kept in the samples.
    `extra_eval(model, index) -> {name: float}` measures the policy that samples rollout `index` (e.g. the hacking
    experiment's gold on fixed held-out prompts), logged as rollout/<name>; it may return {} to skip a rollout.
    """

    def __init__(self, config, tokenizer, pool, reference_run, reward_run, run_dir, extra_metrics=None,
                 extra_eval=None):
        self.config, self.ppo = config, config.ppo
        self.tokenizer, self.pool, self.run_dir = tokenizer, pool, pathlib.Path(run_dir)
        self.reference_run, self.reward_run = reference_run, reward_run
        self.extra_metrics, self.extra_eval = extra_metrics, extra_eval
        self.kl_coef = float(self.ppo.kl_coef)
        self.updates_per_rollout = int(self.ppo.epochs) * int(self.ppo.minibatches)
        self.frozen = None
        # The first answer column of every rollout's rows: the pool's longest prompt (one width for the whole run, so
        # one compilation; not max_prompt_tokens, whose padding columns every trunk would run through)
        self.first = max(len(item["ids"]) for item in pool)

    # --- set up on the trainer's mesh ---
    def attach(self, trainer) -> None:
        """Loads the frozen reference and reward model on the trainer's mesh; on resume, the saved KL coefficient."""
        mesh = trainer.mesh
        reference, _, _ = lm_checkpoint.load_model(self.reference_run, mesh=mesh)
        reward_model, _, _, stats = reward.load_reward_model(self.reward_run, mesh=mesh)
        self.mesh, self.stats = mesh, stats
        self.frozen = dict(reference=nnx.split(reference), reward=nnx.split(reward_model))
        if trainer.start_step:
            self.kl_coef = float(trainer.checkpoints.meta(trainer.start_step)["ppo"]["kl_coef"])

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    # --- the batches ---
    def batches(self, start_step, current_model):
        if start_step % self.updates_per_rollout:
            raise ValueError(f"step {start_step} is inside a rollout ({self.updates_per_rollout} updates each): "
                             f"checkpoints must fall on rollout boundaries")
        minibatch = int(self.config.train.batch_size)
        local = pipeline.local_rows(minibatch, jax.process_index(), jax.process_count())
        for index in range(start_step // self.updates_per_rollout, 10 ** 9):
            data, metrics = self.rollout(current_model(), index)
            for epoch in range(int(self.ppo.epochs)):
                order = np.random.default_rng([self.config.seed, index, epoch]).permutation(len(data["inputs"]))
                for m in range(int(self.ppo.minibatches)):
                    rows = order[m * minibatch:(m + 1) * minibatch][local]
                    yield dict({name: value[rows] for name, value in data.items()}, metrics=metrics)

    def prompts_of(self, index: int) -> list[dict]:
        rows = np.arange(int(self.ppo.rollout_batch))
        picked = pipeline.train_window_ids(index, len(self.pool), len(rows), self.config.seed, rows)
        return [self.pool[i] for i in picked]

    def rollout(self, model, index: int) -> tuple[dict, dict]:
        """Rollout `index`: sample, score, advantages. Returns (per-row arrays, rollout metrics)."""
        ppo, tok = self.ppo, self.tokenizer
        items = self.prompts_of(index)
        prompts = [item["ids"] for item in items]
        key = jax.random.fold_in(jax.random.key(self.config.seed), index)
        out = sample.generate_ids(model, prompts, key, int(ppo.max_new_tokens),
                                  sample.Sampling(temperature=float(ppo.get("temperature", 1.0))),
                                  stop_ids=[tok.token_id(chat.ASSISTANT_END)], vocab_size=tok.n_vocab, values=True)
        scored, (tokens, positions, mask) = self.score(model, prompts, out, index)
        ended = np.asarray(out.stopped)
        metrics = {"rollout/score": float(np.mean(scored["score"])),
                   "rollout/score_raw": float(np.mean(scored["raw"])),
                   "rollout/kl": float(np.mean(scored["kl"])), "rollout/kl_k3": float(np.mean(scored["kl_k3"])),
                   "rollout/kl_coef": self.kl_coef, "rollout/response_length": float(np.mean(out.lengths)),
                   "rollout/end_rate": float(np.mean(ended)), "rollout/index": float(index)}
        if "drift" in scored:
            metrics["rollout/logprob_diff"] = float(scored["drift"])
            metrics["rollout/value_diff"] = float(scored["value_drift"])
        if np.isfinite(scored["explained_variance"]):
            metrics["rollout/value_explained_variance"] = float(scored["explained_variance"])
        answers = [chat.parse_completion(tok, out.tokens[b, :out.lengths[b]]).answer for b in range(len(items))]
        extra = self.extra_metrics(items, answers, ended) if self.extra_metrics else {}
        metrics.update({f"rollout/{name}": float(np.mean(v)) for name, v in extra.items()})
        if self.extra_eval:
            metrics.update({f"rollout/{name}": float(v) for name, v in self.extra_eval(model, index).items()})
        self._write_samples(index, items, answers, scored["score"], ended, scored["kl"], extra)
        if float(ppo.get("kl_target", 0.0)) > 0:  # the coefficient for the next rollout
            self.kl_coef = float(rl_math.adaptive_kl(self.kl_coef, metrics["rollout/kl"], float(ppo.kl_target),
                                                     float(ppo.kl_horizon), len(prompts)))
        data = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions[:, :-1], loss_mask=mask,
                    **{name: full_width(scored[name], self.first) for name in PER_TOKEN})
        return data, metrics

    def score(self, model, prompts, out, index: int):
        """The scoring of rollout `index` (sampled by `model`, generate_ids(values=True)): ({name: numpy array} of
        `_score`, the training rows (tokens, positions, mask) of rollout_rows). Every `drift_every`-th rollout
        (rollout 0 included) also checks the sampler's log-probs and values against the trainer's."""
        ppo = self.ppo
        tokens, positions, mask = rollout_rows(prompts, out, chat.pad_id(self.tokenizer), self.first)
        check_drift = index % int(ppo.get("drift_every", 1)) == 0
        # the policy's parameters only go in for the drift check (splitting them costs ~1 ms at the tiny shape)
        policy_def, policy_state = nnx.split(model) if check_drift else (None, None)
        rows = lm_mesh.named_sharding(self.mesh, ("batch", None), tokens.shape)
        coefs = (self.kl_coef, float(ppo.no_eos_penalty), float(ppo.gamma), float(ppo.lam),
                 float(self.stats["mean"]), float(self.stats["std"]))
        scored = _score(
            (policy_state, self.frozen["reference"][1], self.frozen["reward"][1]),
            *jax.device_put((tokens, positions, mask), rows), out.logprobs, out.values, out.lengths, out.stopped,
            np.asarray(coefs, np.float32), defs=(policy_def, self.frozen["reference"][0], self.frozen["reward"][0]),
            first=self.first, whiten=bool(ppo.get("whiten_advantages", True)),
            check_drift=check_drift)
        return jax.device_get(scored), (tokens, positions, mask)

    def _write_samples(self, index, items, answers, score, ended, kl, extra):
        if jax.process_index() != 0:
            return
        n = int(self.ppo.get("samples_kept", 4))
        rows = [dict(prompt=items[b]["messages"][-1]["content"], answer=answers[b], score=float(score[b]),
                     ended=bool(ended[b]), kl=float(kl[b]), **{k: float(v[b]) for k, v in extra.items()})
                for b in range(min(n, len(items)))]
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.json").write_text(json.dumps(rows, indent=1))


# --- the loss ------------------------------------------------------------------------------------------------------

def make_loss(ppo_config):
    """Clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy, token mean, as sums over the
    minibatch's answer tokens (weight: their number)."""
    clip_eps, value_clip = float(ppo_config.clip_eps), float(ppo_config.value_clip)
    vf_coef, entropy_coef = float(ppo_config.vf_coef), float(ppo_config.entropy_coef)

    def loss(model, batch):
        mask = batch["loss_mask"]
        hidden = model.hidden(batch["inputs"], batch["positions"])
        logits = model.logits(hidden)
        logprobs = lm_model.token_logprobs(logits, batch["targets"])
        values = model.scalar_head(hidden)
        policy_loss, clip_frac = rl_math.ppo_clip_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                                       clip_eps)
        value_loss, value_clip_frac = rl_math.clipped_value_loss(values, batch["old_values"], batch["returns"],
                                                                 mask, value_clip)
        entropy = rl_math.entropy_from_logits(logits, mask)
        total = policy_loss + vf_coef * value_loss - entropy_coef * entropy
        n = jnp.sum(mask.astype(jnp.float32))
        metrics = dict(policy_loss=policy_loss, value_loss=value_loss, entropy=entropy, clip_frac=clip_frac,
                       value_clip_frac=value_clip_frac,
                       approx_kl=rl_math.approx_kl(logprobs, batch["old_logprobs"], mask))
        return total * n, n, {name: value * n for name, value in metrics.items()}

    return loss


# --- the run -------------------------------------------------------------------------------------------------------

def check_config(config) -> None:
    ppo, train = config.ppo, config.train
    rollout, minibatches = int(ppo.rollout_batch), int(ppo.minibatches)
    if rollout % minibatches:
        raise ConfigError(f"config.ppo.rollout_batch={rollout} is not divisible by config.ppo.minibatches="
                          f"{minibatches}")
    if train.batch_size != rollout // minibatches:
        raise ConfigError(f"config.train.batch_size={train.batch_size} must be config.ppo.rollout_batch / "
                          f"config.ppo.minibatches = {rollout // minibatches} (one update per minibatch)")
    updates = int(ppo.epochs) * minibatches
    for key in ("steps", "checkpoint_every"):
        value = int(train.get(key, 0))
        if value % updates:
            raise ConfigError(f"config.train.{key}={value} must be a multiple of config.ppo.epochs x "
                              f"config.ppo.minibatches = {updates}: checkpoints fall on rollout boundaries")
    if int(ppo.get("drift_every", 1)) < 1:
        raise ConfigError(f"config.ppo.drift_every={ppo.drift_every}: must be >= 1 (rollouts between checks)")
    if int(train.get("grad_accum", 1)) != 1:
        raise ConfigError("config.train.grad_accum must be 1 for PPO (one update per minibatch)")


def objective(config, rollouts: Rollouts, policy_run, meta) -> loop.Objective:
    return loop.Objective(
        loss=make_loss(config.ppo), train_batches=rollouts.batches, on_policy=True,
        make_model=lambda: lm_model.TransformerWithScalarHead(config.model, rngs=nnx.Rngs(config.seed)),
        flops_per_token=lm_model.flops_per_token(config.model, config.train.seq_len),
        meta=dict(objective="ppo", data_seed=config.seed, **meta),
        init_from=policy_run, init_fresh=("scalar_head",))


def train_ppo(config, run_dir, policy_run, reward_run, tokenizer, meta, pool, extra_metrics=None,
              stop_after=None, extra_eval=None) -> dict:
    """PPO from `policy_run` (policy and reference) against `reward_run` in `run_dir`; resumes from its checkpoints.
    extra_metrics, extra_eval: see Rollouts."""
    check_config(config)
    rollouts = Rollouts(config, tokenizer, pool, policy_run, reward_run, run_dir, extra_metrics, extra_eval)
    with loop.Trainer(config, run_dir, objective(config, rollouts, policy_run, meta)) as trainer:
        rollouts.attach(trainer)
        batches = trainer.train_batches()
        while trainer.current_step < trainer.total_steps:
            batch = next(batches)
            trainer.meta = dict(trainer.meta, ppo=rollouts.state())  # the KL coefficient of the next rollout
            trainer.step(batch)
            if stop_after is not None and trainer.current_step >= stop_after:
                logging.warning("stopping after step %d as asked (stop_after), as if killed", trainer.current_step)
                break
        return trainer.summary()


def curves(run_dir) -> list[dict]:
    """One record per rollout (its first update's line): rollout index, step and the rollout/* metrics."""
    from lm.train import metrics as lm_metrics
    out = {}
    for record in lm_metrics.read_metrics(pathlib.Path(run_dir) / "metrics.jsonl"):
        if "rollout/index" in record:
            index = int(record["rollout/index"])
            out.setdefault(index, dict(step=record["step"], **{k.split("/", 1)[1]: v for k, v in record.items()
                                                               if k.startswith("rollout/")}))
    return [out[i] for i in sorted(out)]


def run(config, workdir, stop_after: int | None = None) -> dict:
    """PPO from config.ppo.policy (default W/sft) against config.ppo.reward (default W/reward) -> W/ppo/;
    writes W/ppo/ppo_report.json (the per-rollout curves, first and last rollout, samples of both)."""
    policy_run = reward.source_run(workdir, config.ppo.get("policy", "sft"))
    reward_run = reward.source_run(workdir, config.ppo.get("reward", "reward"))
    if policy_run is None or reward_run is None:
        raise ConfigError("config.ppo.policy and config.ppo.reward must name runs (PPO needs a reference and a reward)")
    config, tokenizer, source_meta = reward.setup_from_source(config, workdir, policy_run)
    pool, prompt_stats = prompt_pool(config.ppo, tokenizer, config.seed)
    run_dir = pathlib.Path(workdir) / config.ppo.get("run_dir", RUN_DIR)
    summary = train_ppo(config, run_dir, policy_run, reward_run, tokenizer,
                        reward.tokenizer_meta(tokenizer, policy_run, source_meta), pool, stop_after=stop_after)
    rows = curves(run_dir)
    report = dict(summary, prompts=prompt_stats, curves=rows, first=rows[0] if rows else None,
                  last=rows[-1] if rows else None)
    if rows:
        samples = run_dir / "samples"
        report["samples_first"] = json.loads((samples / f"{int(rows[0]['index'])}.json").read_text())
        report["samples_last"] = json.loads((samples / f"{int(rows[-1]['index'])}.json").read_text())
    (run_dir / "ppo_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report

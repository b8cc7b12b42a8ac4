"""GRPO: RL on checkable answers (issue #16), through the one Trainer with an on-policy batch source.

    python -m lm.train --config=configs/grpo_tiny.py --workdir=W      # starts from W/sft, writes W/grpo/

One rollout: `grpo.prompts` problems of the task's train split, each rendered with the chat template
(`render_for_completion`) and sampled `grpo.group_size` (G) times by `lm.sample.generate_ids` with the live
parameters (`current_model()`); each completion is split into thinking and answer (`parse_completion`), rewarded
by the task on the answer text (`Task.reward`) plus `grpo.format_weight` x `format_reward`; advantages are the
group-normalised rewards named by `grpo.advantage` (rl_math.ADVANTAGES: "grpo" z-score or "dr_grpo" mean-only).
The rollout then gives `grpo.epochs` x `grpo.minibatches` optimizer steps (each epoch a fresh shuffle of its rows
into minibatches), all against the sampler's log-probs as the old policy: clipped ratio with eps_low / eps_high,
aggregated by `grpo.aggregation` (rl_math.aggregate), plus `grpo.beta` x KL (`grpo.kl`, k3 by default) to the
reference (the init parameters, frozen; its log-probs are computed here in the batch source, not in the train
state). Completions cut by the length limit are left out of the loss with `grpo.mask_truncated` (their rewards
still count in their group).

Rows of a training batch (all [rows, W + max_new_tokens - 1]): the prompt left-padded to W, the rollout's longest
prompt rounded up as the sampler pads it (`prompt_width`: a power of two, at least 16, at most `grpo.prompt_len`;
padding at position -1, which attention ignores), then the completion;
inputs/targets are that sequence shifted by one; loss_mask marks the completion's tokens as targets; old_logprobs
(the sampler's), advantages [rows], and ref_logprobs when beta > 0. Where a step's rows are the whole rollout in
order (one minibatch, no gradient accumulation: `shares_prompts`), the loss runs each group's prompt once and
shares its keys and values with the group's G completions (`shared_prompt_hidden`); minibatches of shuffled rows
run every row whole.

Logged every step (batch metrics): reward (total), reward_task, reward_format, no_signal (fraction of groups whose
rewards are all equal), response_len, truncated, rollout and pass; on the first step of every
`grpo.drift_every`-th rollout (rollout 0 included) also logprob_drift, the max |sampler log-prob - trainer
log-prob| over the rollout's completion tokens with the very parameters that sampled them (it should be ~1e-6: a
larger drift is a bug between sample.py and the model); from the loss: clip_frac, approx_kl (to the sampler's
policy), kl (to the reference, when beta > 0), entropy.

Resume is bit-exact by construction: rollout r's problems, sampling key and minibatch shuffles are functions of
(config.seed, r) only, and checkpoints fall only at rollout boundaries (`train.checkpoint_every` and
`train.steps` must be multiples of epochs x minibatches), so a resumed run regenerates the rollout it starts with
from exactly the parameters the uninterrupted run sampled it with.

Evaluation (`train.eval_every` and at the end, and once on the init model before any step): greedy pass@1 and
sampled pass@k (k in `grpo.eval_ks`, `grpo.eval_samples` samples, the unbiased estimator) on `grpo.eval_problems`
held-out test problems, logged as eval/<key>, and written with the curve over steps and a few full completions
(their thinking included) to <workdir>/<grpo.run_dir>/grpo_report.json (`REPORT`; run_dir "grpo" by default).
"""
import functools
import json
import pathlib
import random
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import model as lm_model
from lm import sample
from lm.config import ConfigError
from lm.eval import tasks
from lm.tokenizer import chat
from lm.train import loop, losses, rl_math

REPORT = "grpo_report.json"
TASKS = {"arithmetic": tasks.Arithmetic, "compare_decimals": tasks.CompareDecimals,
         "count_letters": tasks.CountLetters, "identity": tasks.Identity, "gsm8k": tasks.GSM8K}
REPO = pathlib.Path(__file__).resolve().parents[2]
HEAD_CHUNK = 8  # completion positions per chunk of the fused head + loss (grpo_loss): of 4 / 8 / 16, 8 was fastest


# --- config --------------------------------------------------------------------------------------------------------

def default_config() -> ml_collections.ConfigDict:
    """The `config.grpo` section (presets start from it)."""
    return ml_collections.ConfigDict(dict(
        init_from="sft",         # run to start from (and the KL reference): relative to the workdir, or absolute
        init_step=-1,            # its checkpoint step; -1: the latest
        run_dir="grpo",          # this run's directory, relative to the workdir (seeds of a sweep side by side)
        dtype="",                # compute dtype of the policy ("": the init run's model.dtype)
        task="arithmetic",       # a name in TASKS
        task_kwargs={},          # its constructor arguments (difficulty dials; gsm8k: directory)
        train_problems=4096,     # problems of the train split to draw rollouts from (0: all; gsm8k has 7473)
        prompts=8,               # problems per rollout
        group_size=8,            # G samples per problem
        prompt_len=32,           # prompts are left-padded to this; longer train problems are dropped (counted)
        max_new_tokens=48,       # the completion length limit
        temperature=1.0, top_k=0, top_p=1.0,   # rollout sampling
        epochs=1,                # optimisation passes over each rollout
        minibatches=1,           # optimizer steps per pass
        advantage="grpo",        # grpo (z-score) | dr_grpo (mean-only)
        aggregation="token_mean",  # token_mean (DAPO) | sequence_mean (GRPO) | sequence_sum_norm (Dr. GRPO)
        eps_low=0.2, eps_high=0.28,
        beta=0.0,                # KL coefficient to the reference
        kl="k3",                 # a name in rl_math.KL_ESTIMATORS
        format_weight=0.0,       # reward += format_weight * format_reward
        mask_truncated=False,    # leave completions cut by max_new_tokens out of the loss
        drift_every=8,           # rollouts between sampler-vs-trainer log-prob checks (one extra forward each)
        eval_problems=64,        # held-out test problems per evaluation (0: no evaluation)
        eval_samples=8,          # samples per problem for pass@k
        eval_ks=(1, 8),
        eval_temperature=1.0,
        eval_max_new_tokens=0,   # 0: max_new_tokens
        eval_seed=0,             # which test problems (the same for every run seed)
        shown=4,                 # full completions kept in the report per evaluation
    ))


def steps_per_rollout(grpo) -> int:
    return int(grpo.epochs) * int(grpo.minibatches)


def check_config(config) -> None:
    """ConfigErrors naming the key: the rollout schedule, names, and sizes."""
    grpo, train = config.grpo, config.train
    per = steps_per_rollout(grpo)
    if per < 1:
        raise ConfigError(f"config.grpo.epochs={grpo.epochs} x config.grpo.minibatches={grpo.minibatches}: "
                          f"need at least one step per rollout")
    for key in ("steps", "checkpoint_every"):
        if int(train.get(key, 0)) % per:
            raise ConfigError(f"config.train.{key}={train.get(key)} must be a multiple of epochs x minibatches = "
                              f"{per}: checkpoints fall only at rollout boundaries (bit-exact resume)")
    rows = int(grpo.prompts) * int(grpo.group_size)
    if rows % int(grpo.minibatches):
        raise ConfigError(f"config.grpo.minibatches={grpo.minibatches} does not divide the rollout's "
                          f"{grpo.prompts} x {grpo.group_size} = {rows} rows")
    if int(grpo.drift_every) < 1:
        raise ConfigError(f"config.grpo.drift_every={grpo.drift_every}: must be >= 1 (rollouts between checks)")
    if grpo.advantage not in ("grpo", "dr_grpo"):
        raise ConfigError(f"config.grpo.advantage={grpo.advantage!r}: must be grpo or dr_grpo")
    if grpo.aggregation not in rl_math.AGGREGATIONS:
        raise ConfigError(f"config.grpo.aggregation={grpo.aggregation!r}: must be one of "
                          f"{sorted(rl_math.AGGREGATIONS)}")
    if grpo.kl not in rl_math.KL_ESTIMATORS:
        raise ConfigError(f"config.grpo.kl={grpo.kl!r}: must be one of {sorted(rl_math.KL_ESTIMATORS)}")
    if grpo.task not in TASKS:
        raise ConfigError(f"config.grpo.task={grpo.task!r}: must be one of {sorted(TASKS)}")
    if int(grpo.eval_problems) and max(grpo.eval_ks) > grpo.eval_samples:
        raise ConfigError(f"config.grpo.eval_ks={tuple(grpo.eval_ks)}: each k must be <= "
                          f"config.grpo.eval_samples={grpo.eval_samples}")
    if int(grpo.prompt_len) + int(grpo.max_new_tokens) > int(config.model.max_len):
        raise ConfigError(f"config.grpo.prompt_len={grpo.prompt_len} + config.grpo.max_new_tokens="
                          f"{grpo.max_new_tokens} > config.model.max_len={config.model.max_len}")


def make_task(grpo) -> tasks.Task:
    """The task `grpo.task` names with `grpo.task_kwargs`; a relative gsm8k directory is looked up from the
    current directory, then from the repository root (../shared/data/... as the tests use it)."""
    kwargs = dict(grpo.task_kwargs.to_dict() if hasattr(grpo.task_kwargs, "to_dict") else grpo.task_kwargs)
    if grpo.task == "gsm8k":
        directory = pathlib.Path(kwargs.get("directory", "../shared/data/posttrain/gsm8k"))
        if not directory.is_absolute() and not directory.is_dir():
            directory = REPO / directory
        kwargs["directory"] = directory
    try:
        return TASKS[grpo.task](**kwargs)
    except TypeError as error:
        raise ConfigError(f"config.grpo.task_kwargs={kwargs} for {grpo.task}: {error}") from None


# --- rollouts ------------------------------------------------------------------------------------------------------

def problem_pool(task, tokenizer, grpo, seed: int):
    """(examples, prompt ids) of the train split whose prompts fit grpo.prompt_len, and how many did not."""
    n = int(grpo.train_problems) or None
    if n is not None and isinstance(task, tasks.GSM8K):
        n = min(n, len(task.load("train")))
    examples = task.examples("train", n, seed=seed)
    prompts = [chat.render_for_completion(tokenizer, e.prompt, where=f"{task.name} train problem {e.key!r}")
               for e in examples]
    keep = [i for i, p in enumerate(prompts) if len(p) <= grpo.prompt_len]
    dropped = len(examples) - len(keep)
    if dropped:
        logging.warning("%s: %d of %d train problems have prompts longer than config.grpo.prompt_len=%d: dropped",
                        task.name, dropped, len(examples), grpo.prompt_len)
    if len(keep) < grpo.prompts:
        raise ConfigError(f"{task.name}: only {len(keep)} train problems fit config.grpo.prompt_len="
                          f"{grpo.prompt_len}; a rollout needs config.grpo.prompts={grpo.prompts}")
    return [examples[i] for i in keep], [prompts[i] for i in keep], dropped


def prompt_width(prompts, prompt_len: int) -> int:
    """The prompt columns of a rollout's rows: its longest prompt rounded up as the sampler pads (a power of two, at
    least 16), at most prompt_len. Padding costs the update as much as prompt tokens, and short prompts padded to a
    long prompt_len (13 tokens to 32 in the tiny arithmetic runs) were a quarter of its columns; the few widths keep
    the train step's compiles few."""
    return min(sample.bucket(max(map(len, prompts))), prompt_len)


def layout(prompts, completions, lengths, prompt_len: int, pad: int) -> dict:
    """The training rows of prompts (id lists) and completions (int [B, N], `lengths` valid per row).

    Returns inputs, targets, positions (int32 [B, prompt_len + N - 1]) and completion_mask (float32, 1 where the
    target is a completion token). Prompts are right-aligned at prompt_len with padding at position -1."""
    B, N = completions.shape
    tokens = np.full((B, prompt_len + N), pad, np.int32)
    positions = np.full((B, prompt_len + N), -1, np.int32)
    mask = np.zeros((B, prompt_len + N), np.float32)
    for row, (prompt, length) in enumerate(zip(prompts, lengths)):
        start = prompt_len - len(prompt)
        tokens[row, start:prompt_len] = prompt
        tokens[row, prompt_len:prompt_len + length] = completions[row, :length]
        positions[row, start:] = np.arange(prompt_len + N - start)
        mask[row, prompt_len:prompt_len + length] = 1.0
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions[:, :-1],
                completion_mask=mask[:, 1:])


def completion_logprobs_at(logprobs, lengths, prompt_len: int) -> np.ndarray:
    """Per-token values of the completions [B, N] (e.g. the sampler's log-probs) placed at their targets."""
    B, N = logprobs.shape
    out = np.zeros((B, prompt_len + N - 1), np.float32)
    out[:, prompt_len - 1:] = np.where(np.arange(N)[None] < np.asarray(lengths)[:, None], logprobs, 0.0)
    return out


@functools.partial(nnx.jit, static_argnames=("chunk",))
def trainer_logprobs(model, inputs, targets, positions, chunk: int = 0):
    """log p(targets) under `model` for the training rows, as the loss computes them."""
    return losses.sequence_token_logprobs(model, inputs, targets, positions, chunk=chunk)


def rewards_of(task, tokenizer, examples, tokens, lengths, format_weight: float):
    """(task reward, format reward) per row: the task's reward on the parsed ANSWER; format on the whole ids."""
    task_rewards, format_rewards = [], []
    for row, example in enumerate(examples):
        ids = tokens[row, :lengths[row]].tolist()
        task_rewards.append(task.reward(chat.parse_completion(tokenizer, ids).answer, example.reference))
        format_rewards.append(tasks.format_reward(tokenizer, ids) if format_weight else 0.0)
    return np.asarray(task_rewards, np.float32), np.asarray(format_rewards, np.float32)


def make_rollout(model, task, tokenizer, pool, grpo, seed: int, index: int, ref_model=None) -> tuple[dict, dict]:
    """Rollout `index`: (rows of the whole rollout, its metrics). Everything random is keyed by (seed, index)."""
    examples, prompt_ids = pool
    G = int(grpo.group_size)
    rng = np.random.default_rng([seed, index, 0])
    chosen = rng.choice(len(examples), size=int(grpo.prompts), replace=False)
    row_examples = [examples[i] for i in chosen for _ in range(G)]  # prompt-major: a group is G consecutive rows
    row_prompts = [prompt_ids[i] for i in chosen for _ in range(G)]
    sampling = sample.Sampling(float(grpo.temperature), int(grpo.top_k), float(grpo.top_p))
    tick = time.perf_counter()
    out = sample.generate_ids(model, row_prompts, jax.random.fold_in(jax.random.key(seed), index),
                              int(grpo.max_new_tokens), sampling,
                              stop_ids=[tokenizer.token_id(chat.ASSISTANT_END)], vocab_size=tokenizer.n_vocab)
    rollout_seconds = time.perf_counter() - tick
    task_rewards, format_rewards = rewards_of(task, tokenizer, row_examples, out.tokens, out.lengths,
                                              float(grpo.format_weight))
    rewards = task_rewards + float(grpo.format_weight) * format_rewards
    advantages = np.asarray(rl_math.ADVANTAGES[grpo.advantage](rewards, G), np.float32)
    width = prompt_width(row_prompts, int(grpo.prompt_len))
    rows = layout(row_prompts, out.tokens, out.lengths, width, chat.pad_id(tokenizer))
    completion_mask = rows.pop("completion_mask")
    rows["old_logprobs"] = completion_logprobs_at(out.logprobs, out.lengths, width)
    rows["advantages"] = advantages
    truncated = ~out.stopped
    rows["loss_mask"] = completion_mask * (1.0 - truncated[:, None]) if grpo.mask_truncated else completion_mask
    metrics = {}
    if index % int(grpo.drift_every) == 0:
        # The trainer's log-probs of the same tokens with the same parameters: the drift between sampler and
        # trainer. A bug detector, not a training input, so only every drift_every-th rollout pays its forward.
        live = np.asarray(trainer_logprobs(model, rows["inputs"], rows["targets"], rows["positions"]))
        metrics["logprob_drift"] = float(np.max(np.abs(live - rows["old_logprobs"]) * completion_mask, initial=0.0))
    if ref_model is not None:
        rows["ref_logprobs"] = np.asarray(trainer_logprobs(ref_model, rows["inputs"], rows["targets"],
                                                           rows["positions"]))
    groups = rewards.reshape(-1, G)
    metrics.update(reward=float(rewards.mean()), reward_task=float(task_rewards.mean()),
                   reward_format=float(format_rewards.mean()),
                   no_signal=float(np.mean(groups.max(1) == groups.min(1))),
                   response_len=float(out.lengths.mean()), truncated=float(truncated.mean()),
                   rollout_sec=rollout_seconds)
    return rows, metrics


def minibatches(rows: dict, grpo, seed: int, index: int):
    """The rollout's optimizer batches: per epoch a permutation keyed by (seed, index, epoch), cut in minibatches."""
    n = len(rows["advantages"])
    size = n // int(grpo.minibatches)
    for epoch in range(int(grpo.epochs)):
        order = np.random.default_rng([seed, index, 1 + epoch]).permutation(n) if int(grpo.minibatches) > 1 \
            else np.arange(n)
        for part in range(int(grpo.minibatches)):
            take = order[part * size:(part + 1) * size]
            yield epoch, part, {name: value[take] for name, value in rows.items()}


# --- the loss ------------------------------------------------------------------------------------------------------

def aggregation_weight(mask, aggregation: str):
    """What an aggregation averages over: tokens (token_mean), rows with tokens (sequence_mean), rows (sum_norm).
    loss_sum = aggregate * weight, so the loop's loss_sum / weight is the aggregate, and accumulated micro
    batches weigh as the large batch would."""
    if aggregation == "token_mean":
        return jnp.sum(mask)
    if aggregation == "sequence_mean":
        return jnp.sum(jnp.any(mask > 0, axis=1).astype(jnp.float32))
    return jnp.float32(mask.shape[0])


def clipped_token_loss(logp, old_logprobs, advantages, loss_mask, weight, *ref_logprobs, eps_low, eps_high,
                       beta=0.0, kl="k3"):
    """Each token's share of grpo_loss's loss: weight x (the clipped-ratio term, rl_math.ppo_clip_terms, + beta x
    the KL estimate to the reference when ref_logprobs are given), 0 where loss_mask is 0; all arrays [..., T].
    weight: the aggregation's weight of each token (`token_weights`), so the loss is the sum over tokens."""
    per_token, _ = rl_math.ppo_clip_terms(logp, old_logprobs, advantages, loss_mask, eps_low, eps_high)
    if ref_logprobs:
        per_token = per_token + beta * jnp.where(loss_mask > 0, rl_math.KL_ESTIMATORS[kl](logp, ref_logprobs[0]), 0.0)
    return weight * per_token


def token_weights(mask, aggregation: str, max_len=None):
    """d aggregate(x) / dx, float32 [B, T]: every aggregation is linear in the per-token values x, so
    rl_math.aggregate(x, mask, aggregation) == sum(token_weights(mask, aggregation) * x)."""
    return jax.grad(lambda x: rl_math.aggregate(x, mask, aggregation, max_len=max_len))(jnp.zeros(mask.shape))


def shared_prompt_hidden(model, inputs, positions, start: int, group_size: int):
    """`model.hidden(inputs, positions)` at columns start.. (the last prompt column and the completions) of rows
    that come in groups of `group_size` consecutive rows with one prompt in columns ..start: each group's prompt
    runs once, and its keys and values (a KV cache) serve the group's completions, so the trunk sees P prompts
    instead of P x G copies of them (a third of the tokens of the tiny arithmetic rows)."""
    width, prompts = start + 1, inputs.shape[0] // group_size
    prompt_hidden, cache = model.hidden(inputs[::group_size, :width], positions[::group_size, :width],
                                        cache=model.init_cache(prompts, inputs.shape[1]))
    group_of_row = jnp.repeat(jnp.arange(prompts), group_size)
    hidden, _ = model.hidden(inputs[:, width:], positions[:, width:],
                             cache=lm_model.take_cache_rows(cache, group_of_row))
    return jnp.concatenate([prompt_hidden[group_of_row, -1:], hidden], axis=1)


def grpo_loss(model, batch, aggregation="token_mean", eps_low=0.2, eps_high=0.28, beta=0.0, kl="k3",
              completion_start=0, max_len=None, chunk=0, group_size=1):
    """(loss_sum, weight, metric_sums) of the clipped-ratio loss (+ beta x KL to the reference) on training rows.

    completion_start: the first target column that can be a completion token (the row's prompt width - 1, or
    -max_new_tokens: the last columns): the LM head, the largest matmul of a small model, the vocabulary-wide
    log-softmax and the last block's queries and MLP (`Transformer.hidden_at`) run only from there (TRL's
    logits_to_keep). Dr. GRPO's constant is `max_len` (default the whole row length), so the loss is the same as
    over every column. The head, its log-softmax, the per-token loss (`clipped_token_loss`) and their gradients
    run fused, `chunk` positions at a time (losses.head_token_loss): one exponential per logit gives the
    log-probs, the entropy metric and the gradient. group_size > 1: the rows come in groups of that many
    consecutive rows with one prompt (a whole rollout in its order), and each prompt runs once
    (`shared_prompt_hidden`); the loss is the same."""
    columns = batch["targets"].shape[1] if max_len is None else max_len

    def completions(x):
        return x[:, completion_start:]
    mask = completions(batch["loss_mask"]).astype(jnp.float32)
    old_logprobs = completions(batch["old_logprobs"])
    data = [old_logprobs, batch["advantages"], mask, token_weights(mask, aggregation, columns)]
    if "ref_logprobs" in batch:
        data.append(completions(batch["ref_logprobs"]))
    token_loss = functools.partial(clipped_token_loss, eps_low=eps_low, eps_high=eps_high, beta=beta, kl=kl)
    rows, T = batch["targets"].shape
    start = completion_start % T if completion_start else 0
    if group_size > 1:
        hidden = shared_prompt_hidden(model, batch["inputs"], batch["positions"], start, group_size)
    else:
        hidden = model.hidden_at(batch["inputs"], jnp.broadcast_to(jnp.arange(start, T, dtype=jnp.int32),
                                                                   (rows, T - start)), batch["positions"])
    loss, logp, entropy = losses.head_token_loss(model, hidden, completions(batch["targets"]), token_loss, data,
                                                 chunk)
    _, clip_frac = rl_math.ppo_clip_loss(logp, old_logprobs, batch["advantages"], mask, eps_low, eps_high)
    metrics = dict(clip_frac=clip_frac, approx_kl=rl_math.approx_kl(logp, old_logprobs, mask),
                   entropy=rl_math.masked_mean(entropy, mask))
    if "ref_logprobs" in batch:
        metrics["kl"] = rl_math.masked_mean(rl_math.KL_ESTIMATORS[kl](logp, completions(batch["ref_logprobs"])), mask)
    weight = aggregation_weight(mask, aggregation)
    return loss * weight, weight, {name: value * weight for name, value in metrics.items()}


def shares_prompts(config) -> bool:
    """Whether each train step sees whole groups in rollout order (one minibatch, no gradient accumulation, whose
    micro batches take strided rows), so that grpo_loss can run each prompt once."""
    return int(config.grpo.minibatches) == 1 and int(config.train.get("grad_accum", 1)) == 1


def make_loss(config):
    # Rows are as wide as their rollout's prompts need (prompt_width): the completions are the last max_new_tokens
    # columns, and Dr. GRPO's constant stays prompt_len + max_new_tokens - 1 whatever the width.
    grpo = config.grpo
    return functools.partial(grpo_loss, aggregation=grpo.aggregation, eps_low=float(grpo.eps_low),
                             eps_high=float(grpo.eps_high), beta=float(grpo.beta), kl=grpo.kl,
                             completion_start=-int(grpo.max_new_tokens),
                             max_len=int(grpo.prompt_len) + int(grpo.max_new_tokens) - 1, chunk=HEAD_CHUNK,
                             group_size=int(grpo.group_size) if shares_prompts(config) else 1)


# --- evaluation ----------------------------------------------------------------------------------------------------

class FittingProblems(tasks.Task):
    """`task` with only the problems whose rendered prompt is at most `limit` tokens (so that prompt + completion
    fit the model's positions); a file task's n problems are drawn from those by the seed."""

    def __init__(self, task, tokenizer, limit: int):
        self.task, self.tokenizer, self.limit, self.name = task, tokenizer, limit, task.name

    def examples(self, split, n=None, seed=0):
        if isinstance(self.task, tasks.GSM8K):  # a seeded order of the whole file, the first n that fit
            candidates = self.task.examples(split)
            random.Random(f"{self.name}:{split}:{seed}").shuffle(candidates)
        else:
            candidates = self.task.examples(split, n, seed=seed)
        found = []
        for example in candidates:
            if n is not None and len(found) == n:
                break
            if len(chat.render_for_completion(self.tokenizer, example.prompt)) <= self.limit:
                found.append(example)
        return found

    def reward(self, answer_text, reference):
        return self.task.reward(answer_text, reference)


def evaluate(model, tokenizer, task, grpo) -> dict:
    """Greedy pass@1 and sampled pass@k on the held-out problems: numbers, plus "shown" full completions."""
    max_new = int(grpo.eval_max_new_tokens) or int(grpo.max_new_tokens)
    task = FittingProblems(task, tokenizer, model.spec.max_len - max_new)
    n, seed = int(grpo.eval_problems), int(grpo.eval_seed)
    greedy = tasks.evaluate(model, tokenizer, task, "test", n=n, samples=1, ks=(1,), max_new_tokens=max_new,
                            seed=seed, sampling=sample.Sampling(temperature=0.0))
    sampled = tasks.evaluate(model, tokenizer, task, "test", n=n, samples=int(grpo.eval_samples),
                             ks=tuple(int(k) for k in grpo.eval_ks), max_new_tokens=max_new, seed=seed,
                             sampling=sample.Sampling(temperature=float(grpo.eval_temperature)))
    numbers = {"greedy_pass@1": greedy["pass@1"], "greedy_format": greedy["format"],
               "greedy_ended": greedy["ended"], "reward": sampled["reward"], "format": sampled["format"],
               **{f"pass@{k}": sampled[f"pass@{k}"] for k in grpo.eval_ks}}
    return dict(numbers, shown=greedy["shown"][:int(grpo.shown)])


def numbers_only(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


# --- the objective and the run -------------------------------------------------------------------------------------

def resolve_init(config, workdir) -> pathlib.Path:
    run = pathlib.Path(config.grpo.init_from)
    return run if run.is_absolute() else pathlib.Path(workdir) / run


def init_step(grpo):
    return None if int(grpo.init_step) < 0 else int(grpo.init_step)


def with_init_model(config, init_config) -> ml_collections.ConfigDict:
    """A copy of config with the init run's model (shapes must match it) and batch / seq_len from the rollout."""
    config = ml_collections.ConfigDict(config.to_dict())
    grpo = config.grpo
    config.model = ml_collections.ConfigDict(init_config.model.to_dict())
    if grpo.dtype:
        config.model.dtype = grpo.dtype
    config.train.batch_size = int(grpo.prompts) * int(grpo.group_size) // int(grpo.minibatches)
    config.train.seq_len = int(grpo.prompt_len) + int(grpo.max_new_tokens) - 1
    return config


def objective(config, workdir, tokenizer, task, report: dict, init_run, tokenizer_dir=None) -> loop.Objective:
    """The GRPO Objective (on-policy batches from rollouts, the clipped loss, the pass@k eval) for a config that
    `with_init_model` resolved. `report` collects the evaluations' shown completions."""
    grpo, seed = config.grpo, int(config.seed)
    state = {}

    def train_batches(start_step, current_model):
        if "pool" not in state:
            state["pool"] = problem_pool(task, tokenizer, grpo, seed)
        pool = state["pool"][:2]
        ref_model = None
        if float(grpo.beta) > 0:  # the frozen reference: the init parameters, outside the train state
            ref_model, _, _ = lm_checkpoint.load_model(None, step=init_step(grpo),
                                                       directory=lm_checkpoint.find_checkpoints(init_run))
        per = steps_per_rollout(grpo)
        if start_step % per:
            raise ValueError(f"resuming at step {start_step}, inside a rollout of {per} steps: checkpoints must fall "
                             f"at rollout boundaries")
        for index in range(start_step // per, 10 ** 9):
            rows, metrics = make_rollout(current_model(), task, tokenizer, pool, grpo, seed, index, ref_model)
            for epoch, part, batch in minibatches(rows, grpo, seed, index):
                step_metrics = dict(metrics, rollout=index, epoch=epoch, minibatch=part)
                if epoch or part:
                    step_metrics.pop("logprob_drift", None)   # measured only before the rollout's first update
                    step_metrics.pop("rollout_sec")
                yield dict(batch, metrics=step_metrics)

    def run_eval(model):
        result = evaluate(model, tokenizer, task, grpo)
        report["last_shown"] = result.pop("shown")
        return result

    return loop.Objective(
        loss=make_loss(config), train_batches=train_batches, on_policy=True,
        make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(seed)),
        evals={"eval": run_eval} if int(grpo.eval_problems) else {},
        flops_per_token=lm_model.flops_per_token(config.model, config.train.seq_len),
        meta=dict(objective="grpo", task=grpo.task, tokenizer_hash=tokenizer.hash, tokenizer_name=tokenizer.name,
                  tokenizer_dir=str(tokenizer_dir) if tokenizer_dir else None, data_seed=seed),
        init_from=init_run, init_step=init_step(grpo))


def run(config, workdir, stop_after: int | None = None, task=None) -> dict:
    """GRPO from config.grpo.init_from into <workdir>/grpo/ (resuming there if it has checkpoints).

    Writes <workdir>/grpo/grpo_report.json and returns the loop's summary with before / after evaluations.
    `task` overrides config.grpo.task (a Task object, e.g. a test's own reward).
    """
    grpo_config = default_config()
    grpo_config.update(config.grpo.to_dict())
    config = ml_collections.ConfigDict(config.to_dict())
    config.grpo = grpo_config
    workdir = pathlib.Path(workdir)
    run_dir = workdir / config.grpo.run_dir
    init_run = resolve_init(config, workdir)
    init_model, tokenizer, init_config, init_meta = lm_checkpoint.load_run(init_run, step=init_step(config.grpo))
    config = with_init_model(config, init_config)
    check_config(config)
    task = task or make_task(config.grpo)
    report_path = run_dir / REPORT
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if int(config.grpo.eval_problems) and (not has_checkpoints(run_dir) or "before" not in report):
        logging.info("evaluating the init model %s before RL", init_run)
        before = evaluate(init_model, tokenizer, task, config.grpo)
        report = dict(before=numbers_only(before), before_shown=before["shown"])
    del init_model
    tokenizer_dir = lm_checkpoint.find_tokenizer_dir(init_run, init_meta)
    live = {}
    summary = loop.train(config, run_dir, objective(config, workdir, tokenizer, task, live, init_run, tokenizer_dir),
                         stop_after=stop_after)
    report.update(write_report(run_dir, report, live, config, init_run, init_meta))
    return dict(summary, before=report.get("before"), after=report.get("after"), report=str(report_path))


def has_checkpoints(run_dir: pathlib.Path) -> bool:
    directory = lm_checkpoint.checkpoint_dir(run_dir)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def write_report(run_dir: pathlib.Path, report: dict, live: dict, config, init_run, init_meta) -> dict:
    """grpo_report.json: before / after numbers, the eval curve and the rollout reward curve over steps, shown
    completions (before, and from the last evaluation)."""
    from lm.train import metrics as lm_metrics

    records = lm_metrics.read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    prefix = "eval/"
    curve = [dict(step=0, **report["before"])] if "before" in report else []
    curve += [
        dict(step=r["step"], **{k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)})
        for r in records if any(k.startswith(prefix) for k in r)]
    keys = ("reward", "reward_task", "no_signal", "response_len", "truncated", "clip_frac", "kl", "approx_kl",
            "entropy", "logprob_drift", "loss")
    rewards = [dict(step=r["step"], **{k: r[k] for k in keys if k in r}) for r in records]
    report = dict(report, task=config.grpo.task, task_kwargs=config.grpo.task_kwargs.to_dict(),
                  grpo=config.grpo.to_dict(), seed=int(config.seed), init_from=str(init_run),
                  init_step=init_meta.get("step"), steps=records[-1]["step"] if records else 0,
                  curve=curve, rollouts=rewards)
    if len(curve) > 1 and records and curve[-1]["step"] == records[-1]["step"]:
        report["after"] = {k: v for k, v in curve[-1].items() if k != "step"}
    if "last_shown" in live:
        report["after_shown"] = live["last_shown"]
    (run_dir / REPORT).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report

"""GRPO's wiring (lm/train/grpo.py): the loss on a hand-made rollout batch against numpy, the rollout layout and an
old-policy ratio of 1 on the first pass (sampler vs trainer log-prob drift), a tiny random model learning an easy
reward, bit-exact resume, config errors, and configs/grpo_gsm8k.py for 2 steps on a tiny model imported through
lm.model.hf. (The advantage and aggregation math itself is tested in test_rl_math.py.)"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import hf as lm_hf
from lm import sample
from lm.eval import tasks, tiny_runs
from lm.model import Transformer, token_logprobs
from lm.model import hf as model_hf
from lm.tokenizer import chat
from lm.tokenizer import train as tokenizer_train
from lm.train import grpo, metrics, rl_math

MODEL = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 64,
         "model.max_len": 48}
TIMING = ("tokens_per_sec", "all_tokens_per_sec", "mfu", "rollout_sec")


@pytest.fixture(scope="module")
def tok():
    return tiny_runs.arithmetic_tokenizer(300)


def grpo_config(**overrides):
    base = {**MODEL, "grpo.prompts": 8, "grpo.group_size": 8, "grpo.prompt_len": 32, "grpo.max_new_tokens": 6,
            "grpo.minibatches": 2, "grpo.drift_every": 2, "grpo.train_problems": 200, "grpo.eval_problems": 0,
            "train.seq_len": 37,
            "train.steps": 16,
            "train.lr": 1e-2, "train.eval_every": 0, "train.checkpoint_every": 4, "train.keep_checkpoints": 5,
            "mesh.data": 8}
    return lm_config.load("configs/grpo_tiny.py", {**base, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tok):
    """A pipeline workdir whose sft/ run is a freshly initialised tiny model."""
    workdir = tmp_path_factory.mktemp("pipeline")
    config = grpo_config(model__vocab_size=tok.n_vocab)
    tiny_runs.random_run(workdir / "sft", config, tok)
    return workdir


def init_model(workdir):
    return lm_checkpoint.load_run(workdir / "sft")


# --- the loss against numpy ------------------------------------------------------------------------------------------

def numpy_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation):
    ratio = np.exp(logp - old)
    a = adv[:, None]
    per_token = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    d = ref - logp
    per_token = per_token + beta * (np.exp(d) - d - 1)
    if aggregation == "token_mean":
        return (per_token * mask).sum() / mask.sum()
    rows = mask.sum(1) > 0
    return ((per_token * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_loss_equals_a_numpy_reference(workdir, tok, aggregation):
    """A hand-made batch: 4 rows with left-padded prompts, completions of different lengths (one row empty), old and
    reference log-probs off the policy so ratios clip on both sides."""
    model, _, _, _ = init_model(workdir)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    completions = np.array([[11, 12, 13, 14], [15, 16, 0, 0], [17, 18, 19, 0], [0, 0, 0, 0]], np.int32)
    lengths = np.array([4, 2, 3, 0])
    rows = grpo.layout(prompts, completions, lengths, prompt_len=6, pad=chat.pad_id(tok))
    mask = rows.pop("completion_mask")
    assert mask.sum(1).tolist() == [4, 2, 3, 0] and rows["inputs"].shape == (4, 9)
    np.testing.assert_array_equal(rows["targets"][0, 5:], [11, 12, 13, 14])  # completion starts at target 5
    assert rows["positions"][1].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    logits = np.asarray(model(jnp.asarray(rows["inputs"]), positions=jnp.asarray(rows["positions"])), np.float64)
    logsoftmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(logsoftmax, rows["targets"][..., None], -1)[..., 0]
    offsets = np.resize([-0.5, 0.5, -0.1, 0.1, 0.3], logp.size).reshape(logp.shape)  # ratios e^{-+0.5} clip
    old = (logp + offsets) * mask
    ref = logp + rng.normal(0, 0.3, logp.shape)
    adv = np.array([1.5, -0.7, 0.4, 2.0])
    batch = dict(rows, loss_mask=mask, old_logprobs=old.astype(np.float32), ref_logprobs=ref.astype(np.float32),
                 advantages=adv.astype(np.float32))
    loss_sum, weight, sums = grpo.grpo_loss(model, {k: jnp.asarray(v) for k, v in batch.items()},
                                            aggregation=aggregation, eps_low=0.2, eps_high=0.28, beta=0.1)
    want = numpy_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.1, aggregation)
    assert float(weight) == (9 if aggregation == "token_mean" else 3)
    np.testing.assert_allclose(float(loss_sum / weight), want, rtol=1e-5)
    ratio = np.exp(logp - old)
    a = adv[:, None] * np.ones_like(ratio)
    clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8))
    assert 0 < clipped[mask > 0].mean() < 1
    want_kl = ((np.exp(ref - logp) - (ref - logp) - 1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(sums["clip_frac"] / weight), clipped[mask > 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["kl"] / weight), want_kl, rtol=1e-5)


def plain_grpo_loss(model, batch, aggregation, eps_low, eps_high, beta, completion_start, max_len):
    """grpo_loss as it was before the fused head: materialised logits, token_logprobs, rl_math's clipped loss and
    KL aggregated over the completion columns, entropy from the logits."""
    def completions(x):
        return x[:, completion_start:]
    logits = model.logits(completions(model.hidden(batch["inputs"], batch["positions"])))
    logp = token_logprobs(logits, completions(batch["targets"]))
    mask, old = completions(batch["loss_mask"]), completions(batch["old_logprobs"])
    loss, clip_frac = rl_math.ppo_clip_loss(logp, old, batch["advantages"], mask, eps_low, eps_high, aggregation,
                                            max_len=max_len)
    per_token = rl_math.kl_k3(logp, completions(batch["ref_logprobs"]))
    loss = loss + beta * rl_math.aggregate(per_token, mask, aggregation, max_len=max_len)
    weight = grpo.aggregation_weight(mask, aggregation)
    metrics = dict(clip_frac=clip_frac, approx_kl=rl_math.approx_kl(logp, old, mask), kl=rl_math.masked_mean(
        per_token, mask), entropy=rl_math.entropy_from_logits(jax.lax.stop_gradient(logits), mask))
    return loss * weight, weight, {name: value * weight for name, value in metrics.items()}


@pytest.mark.parametrize("aggregation", sorted(rl_math.AGGREGATIONS))
def test_fused_loss_and_gradients_equal_the_plain_path(aggregation):
    """grpo_loss (the last block at the completion columns only, head, log-softmax and per-token loss fused chunk
    by chunk: losses.head_token_loss) gives the loss, metrics and parameter gradients of the plain path, whole or
    in chunks that do not divide the columns; under jit, with left padding, and with masked tokens far off the
    policy (old log-probs 1e30, reference -50)."""
    config = lm_config.load("configs/tiny.py", {**MODEL, "model.n_layers": 2, "model.vocab_size": 50,
                                                "model.dtype": "float32", "train.seq_len": 16})
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    B, T, N = 6, 11, 7   # N completion columns
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    mask[:, :T - N] = 0
    mask[2] = 0   # a row without tokens
    old = np.where(mask > 0, rng.normal(-4, 0.4, (B, T)), 1e30).astype(np.float32)
    ref = np.where(mask > 0, rng.normal(-4, 0.4, (B, T)), -50.0).astype(np.float32)
    batch = dict(inputs=rng.integers(0, 50, (B, T)), targets=rng.integers(0, 50, (B, T)),
                 positions=np.broadcast_to(np.arange(T), (B, T)) - rng.integers(0, 3, (B, 1)), loss_mask=mask,
                 old_logprobs=old, ref_logprobs=ref, advantages=rng.normal(0, 1, B).astype(np.float32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    kwargs = dict(aggregation=aggregation, eps_low=0.2, eps_high=0.28, beta=0.1, completion_start=-N, max_len=20)
    graphdef, params = nnx.split(model)

    def value_and_grad(loss):
        def of_params(p, batch):
            loss_sum, weight, sums = loss(nnx.merge(graphdef, p), batch, **kwargs)
            return loss_sum, (weight, sums)
        return jax.jit(jax.value_and_grad(of_params, has_aux=True))(params, batch)

    want = value_and_grad(plain_grpo_loss)
    for chunk in (0, 3, N):
        got = value_and_grad(lambda *a, **k: grpo.grpo_loss(*a, **k, chunk=chunk))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(got))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)


# --- a rollout: layout, rewards, advantages, drift ----------------------------------------------------------------

def test_rollout_rows_and_first_pass_ratio_is_one(workdir, tok):
    """The rows of a sampled rollout rebuild prompt + completion; the trainer's log-probs of the sampled tokens with
    the sampling parameters equal the sampler's (drift < 1e-4), so every ratio of the first pass is 1: the loss
    clips nothing and its approx_kl is ~0. Rewards are the task's, advantages the group z-score."""
    model, _, config, _ = init_model(workdir)
    config = grpo.with_init_model(grpo_config(), config)
    task = tiny_runs.HasDigit()
    pool = grpo.problem_pool(task, tok, config.grpo, seed=0)[:2]
    rows, metrics_ = grpo.make_rollout(model, task, tok, pool, config.grpo, seed=0, index=4)
    again, _ = grpo.make_rollout(model, task, tok, pool, config.grpo, seed=0, index=4)
    jax.tree.map(np.testing.assert_array_equal, rows, again)  # keyed by (seed, index)
    other, other_metrics = grpo.make_rollout(model, task, tok, pool, config.grpo, seed=0, index=5)
    assert not np.array_equal(other["targets"], rows["targets"])
    # the drift is checked every drift_every rollouts
    assert metrics_["logprob_drift"] < 1e-4 and "logprob_drift" not in other_metrics
    # rows as wide as the rollout's prompts: the longest rounded up as the sampler pads it, not prompt_len
    G, N = config.grpo.group_size, config.grpo.max_new_tokens
    P = rows["inputs"].shape[1] - N + 1
    longest = int((rows["positions"][:, :P] >= 0).sum(1).max())   # the prompt columns of a row hold its prompt
    assert P == sample.bucket(longest) < config.grpo.prompt_len
    completions = [rows["targets"][r, P - 1:][rows["loss_mask"][r, P - 1:] > 0] for r in range(len(rows["targets"]))]
    rewards = np.array([task.reward(chat.parse_completion(tok, c).answer, "") for c in completions])
    assert metrics_["reward"] == pytest.approx(rewards.mean()) and 0 < rewards.mean() < 1
    grouped = rewards.reshape(-1, G)
    std = grouped.std(1, ddof=1, keepdims=True)
    want = np.where(std > 0, (grouped - grouped.mean(1, keepdims=True)) / (std + 1e-6), 0).reshape(-1)
    np.testing.assert_allclose(rows["advantages"], want, rtol=1e-5, atol=1e-6)
    assert metrics_["no_signal"] == pytest.approx(np.mean(grouped.max(1) == grouped.min(1)))
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    loss_sum, weight, sums = grpo.grpo_loss(model, batch)
    assert float(sums["clip_frac"]) == 0.0 and float(sums["approx_kl"] / weight) < 1e-8
    batch["advantages"] = batch["advantages"] + 0.5   # (a nonzero loss) the LM head only on completion columns:
    batch["ref_logprobs"] = batch["old_logprobs"] - 0.1   # the same loss and metrics, every aggregation
    for aggregation in rl_math.AGGREGATIONS:
        whole = grpo.grpo_loss(model, batch, aggregation=aggregation, beta=0.1)
        cut = grpo.grpo_loss(model, batch, aggregation=aggregation, beta=0.1, completion_start=P - 1)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), cut, whole)
    live = np.asarray(grpo.trainer_logprobs(model, batch["inputs"], batch["targets"], batch["positions"]))
    ratio = np.exp(live - rows["old_logprobs"])[rows["loss_mask"] > 0]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_shared_prompts_give_the_loss_and_gradients_of_whole_rows(workdir, tok, scan_layers):
    """grpo_loss with group_size=G (each group's prompt run once, its KV cache shared by the G completions) equals
    the whole-row path in loss, metrics and parameter gradients, on a sampled rollout (left-padded prompts of
    several lengths, completions stopped early), with stacked layers too; and the config shares prompts only where
    a step sees whole groups in order."""
    model, _, config, _ = init_model(workdir)
    config = grpo.with_init_model(grpo_config(), config)
    pool = grpo.problem_pool(tiny_runs.HasDigit(), tok, config.grpo, seed=0)[:2]
    rows, _ = grpo.make_rollout(model, tiny_runs.HasDigit(), tok, pool, config.grpo, seed=0, index=1)
    prompt_lengths = (rows["positions"][:, :-config.grpo.max_new_tokens + 1] >= 0).sum(1)
    assert len(set(prompt_lengths.tolist())) > 1 and rows["loss_mask"].sum(1).min() < config.grpo.max_new_tokens
    rows["ref_logprobs"] = rows["old_logprobs"] - 0.1
    rows["advantages"] = rows["advantages"] + 0.5
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    if scan_layers:
        stacked = lm_config.load("configs/tiny.py", {**MODEL, "model.n_layers": 2, "model.scan_layers": True,
                                                     "train.seq_len": 37, "model.vocab_size": tok.n_vocab})
        model = Transformer(stacked.model, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    G, N = config.grpo.group_size, config.grpo.max_new_tokens

    def value_and_grad(group_size):
        def of_params(p):
            loss_sum, weight, sums = grpo.grpo_loss(nnx.merge(graphdef, p), batch, beta=0.1, completion_start=-N,
                                                    chunk=4, group_size=group_size)
            return loss_sum, (weight, sums)
        return jax.jit(jax.value_and_grad(of_params, has_aux=True))(params)

    want, got = value_and_grad(1), value_and_grad(G)
    assert float(jnp.abs(want[0][0])) > 0 and all(np.isfinite(x).all() for x in jax.tree.leaves(got))
    # (a prompt token's gradient sums its G completions' shares in another order: float32 noise of that size)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * max(1.0, np.abs(b).max())),
                 got, want)
    assert grpo.shares_prompts(lm_config.load("configs/grpo_tiny.py", {"grpo.minibatches": 1}))
    assert not grpo.shares_prompts(lm_config.load("configs/grpo_tiny.py", {"grpo.minibatches": 2}))
    assert not grpo.shares_prompts(lm_config.load("configs/grpo_tiny.py", {"grpo.minibatches": 1,
                                                                           "train.grad_accum": 2}))


# --- learning, resume, errors -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(workdir):
    summary = grpo.run(grpo_config(), workdir, task=tiny_runs.HasDigit())
    return workdir / "grpo", summary


def test_mean_reward_rises_on_an_easy_reward(straight):
    """16 steps (8 rollouts of 8 x 8 samples, 2 minibatches each) raise a random model's reward from ~0.5 by a
    clear margin; every step logs the rollout's numbers, the drift only before the first update of every
    drift_every-th rollout."""
    run_dir, summary = straight
    lines = metrics.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 17)) and summary["steps"] == 16
    rewards = [r["reward"] for r in lines[::2]]
    assert rewards[0] < 0.75 and np.mean(rewards[-2:]) > rewards[0] + 0.2, rewards
    assert [r["rollout"] for r in lines] == [i // 2 for i in range(16)]
    assert all(("logprob_drift" in r) == (r["minibatch"] == 0 and r["rollout"] % 2 == 0) for r in lines)
    assert max(r["logprob_drift"] for r in lines if "logprob_drift" in r) < 1e-4
    assert lines[0]["clip_frac"] == 0.0 and lines[0]["approx_kl"] < 1e-8  # first pass: ratio 1
    for key in ("no_signal", "response_len", "entropy", "truncated", "reward_task"):
        assert all(key in r for r in lines)
    report = json.loads((run_dir / grpo.REPORT).read_text())
    assert report["steps"] == 16 and [r["step"] for r in report["rollouts"]] == list(range(1, 17))
    _, _, _, meta = lm_checkpoint.load_run(run_dir)
    assert meta["objective"] == "grpo" and meta["init_from"]["objective"] == "sft"


def test_resume_is_bit_exact(straight, workdir, tmp_path):
    """Killed after step 7 (in the middle of rollout 3; last checkpoint 4), run again: the resumed run regenerates
    rollout 2 from checkpoint 4, and every metric and the final parameters equal the uninterrupted run's."""
    resumed = tmp_path / "w"
    resumed.mkdir()
    (resumed / "sft").symlink_to(workdir / "sft")
    grpo.run(grpo_config(), resumed, stop_after=7, task=tiny_runs.HasDigit())
    summary = grpo.run(grpo_config(), resumed, task=tiny_runs.HasDigit())
    assert summary["start_step"] == 4
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    assert strip(metrics.read_metrics(resumed / "grpo" / "metrics.jsonl")) == \
        strip(metrics.read_metrics(straight[0] / "metrics.jsonl"))
    got = nnx.to_pure_dict(nnx.state(lm_checkpoint.load_run(resumed / "grpo")[0], nnx.Param))
    want = nnx.to_pure_dict(nnx.state(lm_checkpoint.load_run(straight[0])[0], nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_config_errors_name_the_key(workdir):
    with pytest.raises(lm_config.ConfigError, match=r"config.train.checkpoint_every=3 must be a multiple of"):
        grpo.run(grpo_config(train__checkpoint_every=3), workdir)
    with pytest.raises(lm_config.ConfigError, match=r"config.grpo.advantage='gae'"):
        grpo.run(grpo_config(grpo__advantage="gae"), workdir)
    with pytest.raises(lm_config.ConfigError, match=r"config.grpo.task='chess'"):
        grpo.run(grpo_config(grpo__task="chess"), workdir)


# --- GSM8K ----------------------------------------------------------------------------------------------------------

def test_gsm8k_config_runs_two_steps_on_a_tiny_hf_model(shared_data, tmp_path):
    """configs/grpo_gsm8k.py on real GSM8K problems for 2 steps, from a tiny random GPT-2 that went out to HF
    format and back in through lm.model.hf and was saved as the SFT run; with the KL term on. The report has the
    before/after evaluation with full completions."""
    directory = shared_data("posttrain/gsm8k/train.jsonl").parent
    questions = [e.prompt[0]["content"] for e in tasks.GSM8K(directory).examples("train", 200, seed=0)]
    tok = tokenizer_train.train(questions, 600)
    config = lm_config.load("configs/grpo_gsm8k.py", {**MODEL, "model.vocab_size": tok.n_vocab,
                                                      "model.max_len": 256, "train.seq_len": 200,
                                                      "model.dtype": "float32"})
    exported = model_hf.export_hf(Transformer(config.model, rngs=nnx.Rngs(3)), config.model, tmp_path / "hf")
    model_config, model = model_hf.load_hf(exported)
    with config.unlocked():
        config.model = model_config
    lm_hf.save_run(tmp_path / "w" / "sft", model, config, tok)
    overrides = {"grpo.prompts": 2, "grpo.group_size": 4, "grpo.prompt_len": 192, "grpo.max_new_tokens": 8,
                 "grpo.minibatches": 1, "grpo.train_problems": 64, "grpo.beta": 0.05, "grpo.dtype": "float32",
                 "grpo.eval_problems": 2,
                 "grpo.eval_samples": 2, "grpo.eval_ks": (1, 2), "train.steps": 2, "train.eval_every": 2,
                 "train.checkpoint_every": 2, "mesh.data": 8}
    config = lm_config.load("configs/grpo_gsm8k.py", overrides)
    summary = grpo.run(config, tmp_path / "w")
    assert summary["steps"] == 2
    lines = metrics.read_metrics(tmp_path / "w" / "grpo" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and "kl" in r for r in lines)
    assert lines[0]["kl"] < 1e-6  # the policy starts at the reference
    report = json.loads((tmp_path / "w" / "grpo" / grpo.REPORT).read_text())
    assert report["task"] == "gsm8k" and [c["step"] for c in report["curve"]] == [0, 2]
    assert set(report["before"]) >= {"greedy_pass@1", "pass@1", "pass@2"} and report["after"]
    assert report["after_shown"][0]["prompt"] and "reference" in report["after_shown"][0]

"""PPO-RLHF on a tiny random policy and reward model: a few updates move both the policy and the value head, the
sampler's log-probs equal the trainer's for the same tokens, the first rollout has zero KL to the reference, the
answer rows line up with what the sampler produced, and a killed and resumed run (adaptive KL) is bit-exact."""

import jax
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import sample
from lm.model import TransformerWithScalarHead
from lm.train import metrics, ppo
from tests.test_reward import make_pipeline_workdir, tiny_config
from tests.test_chat_template import byte_tokenizer


NORMALIZATION = {"mean": 0.1, "std": 2.0}


def add_reward_run(workdir):
    """W/reward: a random reward model with a non-zero head (its scores vary), as a reward run saves it (with its
    score normalisation in the meta)."""
    config = tiny_config("configs/reward_tiny.py", train__seq_len=96)
    model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(7), head_init_std=0.5)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(workdir / "reward"))
    checkpoints.save(1, {"params": params}, {"config": config.to_dict(), "tokenizer_hash": byte_tokenizer().hash,
                                             "objective": "reward", "model_kind": "scalar_head",
                                             "reward_normalization": NORMALIZATION})
    checkpoints.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = make_pipeline_workdir(tmp_path_factory.mktemp("ppo"), init_std=0.2)
    add_reward_run(workdir)
    return workdir


def ppo_config(**overrides):
    base = dict(ppo__rollout_batch=16, ppo__minibatches=2, ppo__epochs=1, ppo__max_new_tokens=8,
                ppo__max_prompt_tokens=32, ppo__n_prompts=64, train__batch_size=8, train__steps=4,
                train__checkpoint_every=2, train__lr=1e-3, train__seq_len=40, train__log_every=1)
    return tiny_config("configs/ppo_tiny.py", **{**base, **overrides})


def params(run):
    return nnx.to_pure_dict(nnx.state(lm_checkpoint.load_model(run)[0], nnx.Param))


@pytest.fixture(scope="module")
def straight(workdir):
    config = ppo_config(train__steps=8, train__checkpoint_every=4, ppo__kl_target=0.5, ppo__kl_horizon=100.0,
                        ppo__epochs=2, ppo__minibatches=2, train__batch_size=8)
    report = ppo.run(config, workdir)
    return workdir / "ppo", report, config


def test_updates_move_policy_and_value_and_log_probs_agree(workdir, straight):
    run_dir, report, _ = straight
    lines = metrics.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 9))
    # the sampler's log-probs (the old-policy ones) against the trainer's: rollout 0, then every drift_every-th
    assert all("rollout/logprob_diff" in r for r in lines[:4]) and not any("rollout/logprob_diff" in r
                                                                            for r in lines[4:])
    for r in lines[:4]:  # and the sampler's values (the old values) against the value head of a forward pass
        assert r["rollout/logprob_diff"] < 1e-4 and r["rollout/value_diff"] < 1e-4
    for r in lines:
        for key in ("entropy", "clip_frac", "approx_kl", "value_loss", "policy_loss", "rollout/kl_k3",
                    "rollout/end_rate", "rollout/response_length", "rollout/score"):
            assert np.isfinite(r[key]), key
    assert abs(lines[0]["rollout/kl"]) < 1e-4 and lines[0]["approx_kl"] < 1e-8  # the policy starts as the reference
    assert lines[-1]["rollout/kl"] != 0
    for r in lines:  # the reward model's score normalised by the mean / std of its checkpoint meta
        assert r["rollout/score"] == pytest.approx((r["rollout/score_raw"] - 0.1) / 2.0, rel=1e-5, abs=1e-6)
    coefs = [r["rollout/kl_coef"] for r in lines]  # 2 rollouts of 4 updates
    assert coefs[:4] == [0.05] * 4 and coefs[4] != 0.05  # adaptive
    after, sft = params(run_dir), params(workdir / "sft")
    assert np.abs(after["embed"] - sft["embed"]).max() > 0                 # the policy moved
    assert np.abs(after["scalar_head"]["weight"]).max() > 0               # the value head learned
    assert [c["index"] for c in report["curves"]] == [0, 1] and len(report["samples_last"]) == 4


def test_rollout_rows_line_up_with_the_sampler():
    out = sample.TokenOutput(tokens=np.array([[5, 6, 9, -1], [7, -1, -1, -1]], np.int32),
                             logprobs=np.zeros((2, 4), np.float32), lengths=np.array([3, 1], np.int32),
                             stopped=np.array([True, False]))
    tokens, positions, mask = ppo.rollout_rows([[1, 2], [3, 4, 8]], out, pad=0, P=4)
    np.testing.assert_array_equal(tokens, [[0, 0, 1, 2, 5, 6, 9, 0], [0, 3, 4, 8, 7, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[-1, -1, 0, 1, 2, 3, 4, -1], [-1, 0, 1, 2, 3, -1, -1, -1]])
    # targets are tokens[:, 1:]: the answer's targets start at column P - 1 = 3
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]])


def test_resume_is_bit_exact(workdir, straight, tmp_path):
    run_dir, _, config = straight
    other = tmp_path / "w"
    (other / "ppo").mkdir(parents=True)
    with pytest.raises(Exception, match="multiple of"):
        ppo.check_config(ppo_config(train__steps=8, train__checkpoint_every=3, ppo__epochs=2))
    for name in ("sft", "reward", "tokenizer"):
        (other / name).symlink_to(workdir / name)
    ppo.run(config, other, stop_after=6)   # checkpoint at 4, killed in the middle of rollout 1
    assert lm_checkpoint.Checkpoints(other / "ppo" / "checkpoints", read_only=True).latest_step() == 4
    ppo.run(config, other)
    drop = ("tokens_per_sec", "all_tokens_per_sec", "mfu")
    strip = lambda lines: [{k: v for k, v in r.items() if k not in drop} for r in lines]
    assert strip(metrics.read_metrics(other / "ppo" / "metrics.jsonl")) == \
        strip(metrics.read_metrics(run_dir / "metrics.jsonl"))
    jax.tree.map(np.testing.assert_array_equal, params(other / "ppo"), params(run_dir))

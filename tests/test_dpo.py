"""DPO: the loss and implicit-reward metrics of a batch against numpy from per-token log-probs computed apart; the
reference log-probs precomputed from the frozen SFT model; a short run from the SFT checkpoint raises held-out
implicit-reward accuracy on the synthetic pairs."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import model as lm_model
from lm.train import dpo, reward
from tests.test_reward import make_pipeline_workdir, pair_rows, tiny_config


def by_hand_logprobs(model, tokens, mask):
    """Sum over the answer of log softmax(logits)[next token], in numpy from the model's logits."""
    logits = np.asarray(model(jnp.asarray(tokens)), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return ((picked - logz) * mask).sum(1)


def test_dpo_loss_wiring_against_numpy():
    config = tiny_config("configs/dpo_tiny.py", model__init_std=0.3)
    policy = lm_model.Transformer(config.model, rngs=nnx.Rngs(0))
    reference = lm_model.Transformer(config.model, rngs=nnx.Rngs(1))
    rows = dpo.with_reference(reference, pair_rows(), 8)
    batch = reward.rows_at(rows, np.arange(8))
    beta, smoothing = 0.3, 0.1
    loss_sum, weight, sums = dpo.make_loss(beta, smoothing)(policy, batch)
    pc, pr = (by_hand_logprobs(policy, batch[s], batch[f"{s}_mask"]) for s in ("chosen", "rejected"))
    rc, rr = (by_hand_logprobs(reference, batch[s], batch[f"{s}_mask"]) for s in ("chosen", "rejected"))
    np.testing.assert_allclose(batch["ref_chosen"], rc, rtol=1e-5)
    z = beta * ((pc - rc) - (pr - rr))
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    want = np.mean(-(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z))
    assert float(weight) == 8
    np.testing.assert_allclose(float(loss_sum) / 8, want, rtol=1e-4)
    np.testing.assert_allclose(float(sums["reward_margin"]) / 8, np.mean(z), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(sums["reward_accuracy"]) / 8, np.mean(z > 0))
    assert 0 < np.mean(z > 0) < 1


def test_dpo_run_raises_held_out_accuracy(tmp_path):
    workdir = make_pipeline_workdir(tmp_path)
    config = tiny_config("configs/dpo_tiny.py", dpo__synthetic_kinds=("repeated", "rambling"),
                         dpo__synthetic_pairs=320, dpo__held_out_fraction=0.2, dpo__beta=0.5, train__seq_len=96,
                         train__batch_size=16, train__steps=40, train__lr=3e-3, train__warmup_steps=5,
                         train__eval_every=20, train__checkpoint_every=40)
    report = dpo.run(config, workdir)
    assert [c["step"] for c in report["held_out_curve"]] == [20, 40]
    assert report["held_out"]["reward_accuracy"] > 0.8, report["held_out"]
    assert report["held_out"]["reward_margin"] > 0
    model, _, meta = lm_checkpoint.load_model(workdir / "dpo")
    assert meta["objective"] == "dpo" and meta["init_from"]["objective"] == "sft" and meta["beta"] == 0.5

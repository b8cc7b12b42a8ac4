"""The reward model: the Bradley-Terry loss, accuracy and margin of a batch against numpy from the model's own
per-position values; scores independent of the padding side and width; training a tiny model on the synthetic
preference set lifts held-out accuracy above 0.9; a killed and resumed run equals the uninterrupted one; HH-RLHF
pairs read and split. Shared fixtures (a pipeline workdir with a tokenizer and a tiny "SFT" checkpoint) live here."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm.data import preferences
from lm.model import Transformer, TransformerWithScalarHead
from lm.train import metrics, reward
from tests.conftest import shared_path
from tests.test_chat_template import byte_tokenizer

TINY_MODEL = {"model.vocab_size": 266, "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2,
              "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_len": 128, "model.dtype": "float32",
              "mesh.data": 8}


def tiny_config(preset="configs/reward_tiny.py", **overrides):
    return lm_config.load(preset, {**TINY_MODEL, **{k.replace("__", "."): v for k, v in overrides.items()}})


def make_pipeline_workdir(path, seed=0, init_std=0.02):
    """A pipeline workdir as post-training finds it: W/tokenizer (a byte-level BPE with the chat tokens) and W/sft/
    holding one checkpoint of a random tiny Transformer (the "SFT" model)."""
    tok = byte_tokenizer()
    tok.save(path / "tokenizer")
    config = tiny_config("configs/tiny.py", model__init_std=init_std, train__seq_len=96)
    model = Transformer(config.model, rngs=nnx.Rngs(seed))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.checkpoint_dir(path / "sft"))
    checkpoints.save(1, {"params": params}, {"config": config.to_dict(), "tokenizer_hash": tok.hash,
                                             "objective": "sft", "model_kind": "transformer"})
    checkpoints.close()
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return make_pipeline_workdir(tmp_path_factory.mktemp("pipeline"))


def pair_rows(n=8, seq_len=96, kinds=("repeated", "rambling")):
    tok = byte_tokenizer()
    rows = preferences.tokenize_pairs(tok, reward.synthetic_pairs(n, 0, kinds), seq_len - 1)
    assert rows["stats"]["rows"] == n
    return rows


def test_bradley_terry_wiring_against_closed_form():
    config = tiny_config()
    model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(0), head_init_std=0.5)
    batch = reward.rows_at(pair_rows(), np.arange(8))
    margin, center = 0.3, 0.05
    loss_sum, weight, sums = reward.make_loss(margin, center)(model, reward.model_batches([batch], 128)[0])
    # Scores by hand: the per-position values read at length - 1 with numpy indexing.
    def by_hand(side):
        values = np.asarray(model.values(jnp.asarray(batch[side])))
        return values[np.arange(8), batch[f"{side}_lengths"] - 1]
    c, r = by_hand("chosen"), by_hand("rejected")
    d = c.astype(np.float64) - r
    want = np.mean(np.log1p(np.exp(-(d - margin)))) + center * np.mean((c + r) ** 2)
    assert float(weight) == 8
    np.testing.assert_allclose(float(loss_sum) / 8, want, rtol=1e-5)
    np.testing.assert_allclose(float(sums["accuracy"]) / 8, np.mean(c > r), rtol=1e-6)
    np.testing.assert_allclose(float(sums["margin"]) / 8, np.mean(d), rtol=1e-5)
    assert 0 < np.mean(c > r) < 1  # the check sees both outcomes


def test_scores_do_not_depend_on_the_padding():
    """Right padding at two widths and left padding (positions -1 on the padding) give the same scores."""
    config = tiny_config()
    model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(0), head_init_std=0.5)
    rows = pair_rows()
    tokens, lengths = rows["chosen_ids"], rows["chosen_lengths"]
    assert len(set(lengths.tolist())) > 1
    right = np.asarray(model.scores(jnp.asarray(tokens), jnp.asarray(lengths)))
    wider = np.concatenate([tokens, np.full((len(tokens), 16), 7, np.int32)], axis=1)  # junk after, not pad
    np.testing.assert_allclose(np.asarray(model.scores(jnp.asarray(wider), jnp.asarray(lengths))), right, atol=1e-5)
    width = tokens.shape[1]
    left = np.zeros_like(tokens)
    positions = np.full_like(tokens, -1)
    for row, n in enumerate(lengths):
        left[row, width - n:] = tokens[row, :n]
        positions[row, width - n:] = np.arange(n)
    values = np.asarray(model.values(jnp.asarray(left), jnp.asarray(positions)))
    np.testing.assert_allclose(values[:, -1], right, atol=1e-5)
    assert np.std(right) > 1e-3


def test_one_row_a_pair_scores_as_two_rows():
    """The shared-prompt row (and the 2B-row fallback, at any width) gives each side the score of its own row."""
    config = tiny_config()
    model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(0), head_init_std=0.5)
    batch = reward.rows_at(pair_rows(kinds=("rambling", "wrong")), np.arange(8))
    # each side alone, read from the full pass at its last token (model.scores and pair_scores use hidden_at)
    want = [np.asarray(model.values(jnp.asarray(batch[side])))[np.arange(8), batch[f"{side}_lengths"] - 1]
            for side in ("chosen", "rejected")]
    prefix = reward.shared_prefix(batch)
    assert prefix.min() > 10  # the prompt is shared ...
    assert np.all(prefix < np.minimum(batch["chosen_lengths"], batch["rejected_lengths"]))  # ... the answers not
    shared, width = reward.pair_layout(batch, max_len=128)
    assert shared and width < 2 * max(batch["chosen_lengths"].max(), batch["rejected_lengths"].max())
    assert reward.pair_layout(batch, max_len=width - 1) == (False, reward.bucket_width(
        max(batch["chosen_lengths"].max(), batch["rejected_lengths"].max()), 96))
    for layout in ((shared, width), (True, 120), (False, 96)):
        packed = reward.pack_pairs(batch, *layout)
        assert packed["tokens"].shape == (8 if layout[0] else 16, layout[1])
        got = reward.pair_scores(model, {k: jnp.asarray(v) for k, v in packed.items()})
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, atol=1e-5)
    assert np.std(want[0] - want[1]) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_at_equals_the_full_pass_read_there(family):
    """hidden_at (the last block's queries and MLP at the read positions only) = hidden read at those positions,
    plain causal, with padding positions, and with a pair mask; jitted and not."""
    config = tiny_config(model__family=family, model__n_layers=2)
    model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(0), head_init_std=0.5)
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 266)
    lengths = np.array([12, 7, 9])
    positions = jnp.asarray(np.where(np.arange(12) < lengths[:, None], np.arange(12), -1), jnp.int32)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, (3, 12, 12)) | jnp.eye(12, dtype=bool)[None]
    index = jnp.asarray([[11, 3], [6, 0], [8, 5]])
    jitted = nnx.jit(lambda m, t, i, p, k: m.hidden_at(t, i, p, mask=k))
    for p, k in ((None, None), (positions, None), (positions, mask), (None, mask)):
        want = np.take_along_axis(np.asarray(model.hidden(tokens, p, mask=k)), np.asarray(index)[..., None], axis=1)
        np.testing.assert_allclose(np.asarray(model.hidden_at(tokens, index, p, mask=k)), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jitted(model, tokens, index, p, k)), want, atol=1e-5)


def test_bucket_widths():
    widths = [reward.bucket_width(n, 1024) for n in range(1, 257)]
    assert sorted(set(widths)) == [8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192,
                                   224, 256]
    assert all(n <= w <= max(8, n * 1.25) for n, w in zip(range(1, 257), widths))
    assert reward.bucket_width(90, 84) == 84


def synthetic_config(**overrides):
    return tiny_config(reward__init_from="none", reward__synthetic_kinds=("repeated", "rambling"),
                       reward__synthetic_pairs=320, reward__held_out_fraction=0.2, train__seq_len=96,
                       train__batch_size=16, train__steps=60, train__lr=3e-3, train__warmup_steps=5,
                       train__eval_every=30, train__checkpoint_every=20, train__log_every=10, **overrides)


@pytest.fixture(scope="module")
def trained(pipeline):
    report = reward.run(synthetic_config(), pipeline)
    return pipeline / "reward", report


def test_training_lifts_held_out_accuracy_above_0_9(trained):
    run_dir, report = trained
    assert report["data"]["held_out"]["rows"] >= 48
    assert report["held_out"]["accuracy"] > 0.9, report["held_out"]
    assert report["held_out"]["margin"] > 0
    lines = metrics.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines if "val_loss" in r] == [30, 60]
    assert lines[-1]["val_accuracy"] == pytest.approx(report["held_out"]["accuracy"], abs=0.07)
    model, tok, meta, stats = reward.load_reward_model(run_dir)
    assert type(model) is TransformerWithScalarHead and meta["objective"] == "reward"
    assert stats == meta["reward_normalization"] == report["normalization"]
    assert json.loads((run_dir / "reward_report.json").read_text())["normalization"] == stats


def direct_score_stats(model, rows):
    """Mean and std (numpy) of the per-position values read at each row's last real token, both sides."""
    scores = []
    for side in ("chosen", "rejected"):
        ids, lengths = rows[f"{side}_ids"], rows[f"{side}_lengths"]
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int32)
        values = np.asarray(model.values(jnp.asarray(ids), jnp.asarray(positions)))
        scores.append(values[np.arange(len(ids)), lengths - 1])
    scores = np.concatenate(scores).astype(np.float64)
    return scores.mean(), scores.std()


def test_checkpoint_meta_holds_the_score_normalization(trained):
    """Every checkpoint's meta holds the mean / std of its own parameters' scores on the training pairs."""
    run_dir, _ = trained
    config = synthetic_config()
    train_rows, _, _ = reward.preference_data(config.reward, byte_tokenizer(), config.train.seq_len, config.seed)
    seen = []
    for step in (20, 60):
        model, _, meta = lm_checkpoint.load_model(run_dir, step=step)
        mean, std = direct_score_stats(model, train_rows)
        assert meta["reward_normalization"]["mean"] == pytest.approx(mean, abs=1e-4)
        assert meta["reward_normalization"]["std"] == pytest.approx(std, rel=1e-4)
        seen.append(meta["reward_normalization"]["std"])
    assert seen[0] != seen[1] and min(seen) > 0  # each checkpoint its own parameters' numbers


def test_resume_is_bit_exact(trained, tmp_path):
    run_dir, _ = trained
    workdir = make_pipeline_workdir(tmp_path)
    reward.run(synthetic_config(), workdir, stop_after=30)   # checkpoint 20, killed after 30
    reward.run(synthetic_config(), workdir)
    drop = ("tokens_per_sec", "all_tokens_per_sec", "mfu")
    strip = lambda lines: [{k: v for k, v in r.items() if k not in drop} for r in lines]
    assert strip(metrics.read_metrics(workdir / "reward" / "metrics.jsonl")) == \
        strip(metrics.read_metrics(run_dir / "metrics.jsonl"))
    got = nnx.to_pure_dict(nnx.state(lm_checkpoint.load_model(workdir / "reward")[0], nnx.Param))
    want = nnx.to_pure_dict(nnx.state(lm_checkpoint.load_model(run_dir)[0], nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_starts_from_the_sft_checkpoint(pipeline, tmp_path):
    """init_from=sft: the trunk is the SFT model's, the head fresh; the run records where it came from."""
    config = tiny_config(reward__synthetic_pairs=64, train__steps=2, train__eval_every=0, train__seq_len=96,
                         reward__run_dir=str(tmp_path / "rm"))
    reward.run(config, pipeline)
    model, _, meta = lm_checkpoint.load_model(tmp_path / "rm")
    sft, _, _ = lm_checkpoint.load_model(pipeline / "sft")
    assert meta["init_from"]["objective"] == "sft" and meta["model_kind"] == "scalar_head"
    moved = np.abs(np.asarray(model.embed[...]) - np.asarray(sft.embed[...])).max()
    assert 0 < moved < 0.05  # two small steps from the SFT trunk (the first moves only the zero-started head)


def test_hh_rlhf_pairs_split_and_fit(pipeline):
    path = shared_path("posttrain/preference/hh_rlhf_harmless_base_test.jsonl.gz")
    config = tiny_config(reward__data=str(path), reward__max_pairs=400)
    train, held, report = reward.preference_data(config.reward, byte_tokenizer(), 128, 0)
    assert report["read"]["kept"] > 2000 and report["read"]["rejected"] == len(report["read"]["examples"])
    assert report["train"]["pairs"] + report["held_out"]["pairs"] == 400
    assert 0 < report["held_out"]["pairs"] < 80
    assert report["train"]["rows"] == len(train["chosen_ids"]) > 0  # most HH pairs are longer than 128 bytes

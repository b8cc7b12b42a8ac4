"""lm.sample: KV-cache decoding against full recomputation, the sampling filters against numpy, batching, keys,
log-probs, stops, a sharded model, the CLIs of lm.sample and lm.eval.icl, and lm.main's sample stage. A small random
model and a small trained BPE."""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint, sample
from lm import config as lm_config
from lm import model as lm_model
from lm import mesh as lm_mesh
from lm.eval import icl
from lm.eval import report as eval_report
from lm.model import Transformer, TransformerWithScalarHead
from lm.tokenizer import train as tokenizer_train

NEW = 12
TEXTS = ("x", "The list", "Return a new sorted list", "def f(x): return x")


def model_config(family="gpt2", vocab_size=512):
    return ml_collections.ConfigDict(dict(
        family=family, vocab_size=vocab_size, n_layers=2, d_model=64, n_heads=4,
        n_kv_heads=4 if family == "gpt2" else 2, d_ff=128, max_len=96, dtype="float32", param_dtype="float32",
        init_std=0.2))


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics
    return tokenizer_train.train(list(topics.values())[:40], 512)


@pytest.fixture(scope="module")
def models(tok):
    return {family: Transformer(model_config(family, tok.n_vocab), rngs=nnx.Rngs(1)) for family in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def prompts(tok):
    ids = [tok.encode(t) for t in TEXTS]
    assert len({len(p) for p in ids}) == len(ids) and max(map(len, ids)) <= sample.PROMPT_BUCKET
    return ids


@pytest.fixture(scope="module")
def greedy(models, prompts):
    return {family: sample.generate_ids(m, prompts, jax.random.key(0), NEW, sample.Sampling(temperature=0))
            for family, m in models.items()}


WIDTH = sample.PROMPT_BUCKET + NEW


def forward(model, tokens):
    """Logits [len(tokens), vocab] of one unpadded sequence (right-filled to a fixed width: one compile)."""
    graphdef, state = nnx.split(model)
    padded = np.zeros((1, WIDTH), np.int32)
    padded[0, :len(tokens)] = tokens
    return _forward(state, padded, graphdef=graphdef)[0, :len(tokens)]


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(state, tokens, *, graphdef):
    return nnx.merge(graphdef, state)(tokens)


def recompute_greedy(model, prompt, n):
    """Greedy decoding the slow way: the whole sequence through the model, no cache, for every new token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(jnp.argmax(forward(model, tokens)[-1])))
    return tokens[len(prompt):]


def forward_logprobs(model, prompt, generated):
    """log p(generated[i] | prompt + generated[:i]) from one forward pass over the unpadded sequence."""
    tokens = list(prompt) + list(generated)
    logprobs = np.asarray(jax.nn.log_softmax(forward(model, tokens), axis=-1))
    return np.array([logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(generated)])


# ------------------------------------------------------------------------------------------------ filters vs numpy


def numpy_nucleus(logits, p):
    """Kept mask of the smallest set of most probable tokens with total probability >= p."""
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
    keep = np.zeros(len(logits), bool)
    keep[order[:min(size, len(logits))]] = True
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.9, 0.99])
def test_top_p_keeps_exactly_the_smallest_nucleus(p):
    logits = np.random.default_rng(0).normal(0, 2, (32, 50)).astype(np.float32)
    kept = np.isfinite(np.asarray(sample.top_p_filter(jnp.asarray(logits), p)))
    for row, logit in zip(kept, logits):
        np.testing.assert_array_equal(row, numpy_nucleus(logit.astype(np.float64), p))
        probs = np.exp(logit) / np.exp(logit).sum()
        assert probs[row].sum() >= p - 1e-6                              # enough mass ...
        assert probs[row].sum() - probs[row].min() < p                   # ... and none of it superfluous
        assert probs[row].min() >= probs[~row].max(initial=0)            # the most probable ones


def test_top_k_keeps_the_k_largest():
    logits = np.random.default_rng(1).normal(size=(16, 40)).astype(np.float32)
    for k in (1, 5, 39):
        kept = np.isfinite(np.asarray(sample.top_k_filter(jnp.asarray(logits), k)))
        expected = np.zeros_like(kept)
        np.put_along_axis(expected, np.argsort(-logits, axis=1)[:, :k], True, axis=1)
        np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(sample.top_k_filter(jnp.asarray(logits), 0), logits)


def test_sampling_distribution_matches_filtered_softmax():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    sampling = sample.Sampling(temperature=1.0, top_p=0.8)  # nucleus {0, 1, 2}
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.jit(jax.vmap(lambda k: sample.choose(logits, k[None], sampling)[0]))(keys)
    counts = np.bincount(np.asarray(draws), minlength=4) / len(draws)
    np.testing.assert_allclose(counts, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0], atol=0.015)


def test_inverse_cdf_draw_follows_the_softmax_and_never_draws_a_filtered_token():
    """One uniform per row (not V Gumbel draws): the softmax's frequencies; filtered (-inf) tokens first, between and
    last are never drawn, whatever the uniform."""
    logits = jnp.log(jnp.array([[0.0, 0.3, 0.0, 0.7, 0.0]] * 20000))
    draws = np.asarray(jax.jit(sample.inverse_cdf_draw)(jax.random.split(jax.random.key(1), 20000), logits))
    counts = np.bincount(draws, minlength=5) / len(draws)
    assert counts[[0, 2, 4]].sum() == 0
    np.testing.assert_allclose(counts, [0.0, 0.3, 0.0, 0.7, 0.0], atol=0.015)


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_equals_full_recomputation(models, prompts, greedy, family):
    out = greedy[family]
    for row, prompt in enumerate(prompts):
        assert out.tokens[row].tolist() == recompute_greedy(models[family], prompt, NEW)
    assert out.lengths.tolist() == [NEW] * len(prompts) and not out.stopped.any()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logprobs_equal_a_forward_pass(models, prompts, greedy, family):
    out = greedy[family]
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(out.logprobs[row], forward_logprobs(models[family], prompt, out.tokens[row]),
                                   atol=2e-5)


def assert_rows_equal_alone(model, rows, keys, tok):
    """Samples `rows` as one batch (row b with keys[b], temperature 1) and asserts every row's tokens and log-probs
    are what its prompt alone with its key gives; -> the batch's TokenOutput."""
    sampling = sample.Sampling(temperature=1.0)
    batched = sample.generate_ids(model, rows, keys, NEW, sampling, stop_ids=[tok.eot_id])
    for row, prompt in enumerate(rows):
        alone = sample.generate_ids(model, [prompt], keys[row:row + 1], NEW, sampling, stop_ids=[tok.eot_id])
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[row])
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[row], atol=2e-5)
    return batched


def test_batched_equals_one_by_one(models, prompts, tok):
    """Row b of a batch (left-padded, sampled with key b) is what prompt b alone with key b gives."""
    model = models["gpt2"]
    batched = assert_rows_equal_alone(model, prompts, jax.random.split(jax.random.key(3), len(prompts)), tok)
    for row, prompt in enumerate(prompts):
        n = batched.lengths[row]  # sampled tokens carry the model's log-probs too
        np.testing.assert_allclose(batched.logprobs[row, :n],
                                   forward_logprobs(model, prompt, batched.tokens[row, :n]), atol=2e-5)


def test_repeated_prompts_prefilled_once_equal_each_alone(models, prompts, tok):
    """Prompts that repeat (RL's G samples of a problem) are prefilled once and their cache copied: every row is
    still what its prompt alone with its key gives."""
    rows = [prompts[1], prompts[1], prompts[2], prompts[1]]
    assert sample.repeated_prompts(rows)[0].tolist() == [0, 2]
    assert_rows_equal_alone(models["gpt2"], rows, jax.random.split(jax.random.key(5), len(rows)), tok)


def test_values_are_the_value_head_of_a_forward_pass(prompts, tok):
    """generate_ids(values=True) reads a TransformerWithScalarHead's head at the state each token was chosen from:
    values[b, i] = the head at the last prompt token (i = 0) or at generated token i - 1 of one forward pass over the
    unpadded sequence, 0 after a row stops; repeated prompts (prefilled once) included. Plain models are refused."""
    model = TransformerWithScalarHead(model_config("llama", tok.n_vocab), rngs=nnx.Rngs(2), head_init_std=0.5)
    rows = [prompts[2], prompts[0], prompts[2], prompts[3]]
    stop = int(sample.generate_ids(model, rows[:1], jax.random.key(4), 3, sample.Sampling()).tokens[0, 2])
    out = sample.generate_ids(model, rows, jax.random.split(jax.random.key(4), len(rows)), NEW, sample.Sampling(),
                              stop_ids=[stop], values=True)
    plain = sample.generate_ids(model, rows, jax.random.split(jax.random.key(4), len(rows)), NEW, sample.Sampling(),
                                stop_ids=[stop])
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert out.lengths.min() < NEW  # a row stopped early
    for row, prompt in enumerate(rows):
        n = out.lengths[row]
        tokens = np.zeros((1, WIDTH), np.int32)
        tokens[0, :len(prompt) + n] = list(prompt) + out.tokens[row, :n].tolist()
        values = np.asarray(model.values(jnp.asarray(tokens)))[0]
        np.testing.assert_allclose(out.values[row, :n], values[len(prompt) - 1:len(prompt) - 1 + n], atol=1e-5)
        assert (out.values[row, n:] == 0).all()
    with pytest.raises(ValueError, match="scalar head"):
        sample.generate_ids(Transformer(model_config(), rngs=nnx.Rngs(0)), rows, jax.random.key(0), 2, values=True)


def test_top_k_1_and_temperature_to_zero_equal_greedy(models, prompts, greedy, tok):
    for sampling in (sample.Sampling(temperature=1.0, top_k=1), sample.Sampling(temperature=1e-4)):
        out = sample.generate_ids(models["gpt2"], prompts, jax.random.key(7), NEW, sampling, stop_ids=[tok.eot_id])
        np.testing.assert_array_equal(out.tokens, greedy["gpt2"].tokens, err_msg=str(sampling))


def test_same_key_same_text_different_keys_different_texts(models, tok):
    model, sampling = models["gpt2"], sample.Sampling(temperature=1.0)
    texts = lambda seed: [c.text for c in sample.generate(model, tok, "The list", jax.random.key(seed), sampling,
                                                         max_new_tokens=NEW, num_samples=4)]
    first = texts(0)
    assert texts(0) == first
    assert len(set(first)) == 4                      # rows of one batch draw independently
    assert set(texts(1)).isdisjoint(first)


def test_stop_tokens_and_sequences(models, prompts, greedy):
    expected = greedy["gpt2"].tokens
    row0, row1 = expected[0].tolist(), expected[1].tolist()
    stop_id = row0[5]
    stop_pair = row1[6:8]
    out = sample.generate_ids(models["gpt2"], prompts, jax.random.key(0), NEW, sample.Sampling(temperature=0),
                              stop_ids=[stop_id], stop_sequences=[stop_pair])
    for row, tokens in enumerate(expected.tolist()):
        ends = [i + 1 for i, t in enumerate(tokens) if t == stop_id]
        ends += [i + 2 for i in range(len(tokens) - 1) if tokens[i:i + 2] == stop_pair]
        n = min(ends, default=NEW)
        assert out.lengths[row] == n and out.stopped[row] == bool(ends)
        assert out.tokens[row, :n].tolist() == tokens[:n]
        assert (out.tokens[row, n:] == sample.NO_TOKEN).all() and (out.logprobs[row, n:] == 0).all()
    assert out.stopped[0] and out.lengths[0] <= 6 and out.lengths[1] <= 8


def test_stop_string_cuts_the_text(models, tok):
    model, greedy = models["gpt2"], sample.Sampling(temperature=0)
    full = sample.generate(model, tok, TEXTS, jax.random.key(0), greedy, max_new_tokens=NEW, stop_at_eot=False)
    assert all(c.finish_reason == "length" and c.text == tok.decode(c.tokens) for c in full)
    stop = full[1].text[len(full[1].text) // 2:][:2]
    cut = sample.generate(model, tok, TEXTS, jax.random.key(0), greedy, max_new_tokens=NEW, stop=[stop],
                          stop_at_eot=False)
    for before, after in zip(full, cut):
        if stop in before.text:
            assert after.text == before.text[:before.text.find(stop)] and after.finish_reason == "stop"
        else:
            assert after.text == before.text and after.finish_reason == "length"
        assert after.tokens == before.tokens[:len(after.tokens)] and len(after.logprobs) == len(after.tokens)
    assert cut[1].finish_reason == "stop"


def test_empty_prompt_starts_a_document(models, tok, prompts):
    greedy = sample.Sampling(temperature=0)
    texts = sample.generate(models["gpt2"], tok, ["", *TEXTS[1:]], jax.random.key(0), greedy, max_new_tokens=NEW)
    ids = sample.generate_ids(models["gpt2"], [[tok.eot_id], *prompts[1:]], jax.random.key(0), NEW, greedy,
                              stop_ids=[tok.eot_id])
    assert texts[0].tokens == ids.tokens[0, :ids.lengths[0]].tolist()


def test_sharded_model_on_a_mesh(models, prompts, greedy):
    mesh = lm_mesh.make_mesh(dict(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(models["gpt2"])
    with jax.set_mesh(mesh):
        state = jax.device_put(state, lm_model.shardings(state, mesh))
    sharded = nnx.merge(graphdef, state)
    assert len(jax.tree.leaves(state)[0].sharding.device_set) == 8
    out = sample.generate_ids(sharded, prompts, jax.random.key(0), NEW, sample.Sampling(temperature=0))
    np.testing.assert_array_equal(out.tokens, greedy["gpt2"].tokens)
    np.testing.assert_allclose(out.logprobs, greedy["gpt2"].logprobs, atol=2e-5)
    streamed, _ = collect(sample.stream(sharded, prompts, jax.random.key(0), NEW, sample.Sampling(temperature=0)),
                          len(prompts), NEW)
    assert_same_output(streamed, greedy["gpt2"])


# ------------------------------------------------------------------------------------------------ streaming


def collect(steps, batch, max_new_tokens):
    """The Steps of a stream laid out as generate_ids' TokenOutput (rows padded with NO_TOKEN / 0)."""
    steps = list(steps)
    assert [s.index for s in steps] == list(range(len(steps)))
    tokens = np.full((batch, max_new_tokens), sample.NO_TOKEN, np.int32)
    logprobs = np.zeros((batch, max_new_tokens), np.float32)
    for s in steps:
        tokens[:, s.index], logprobs[:, s.index] = s.tokens, s.logprobs
    stopped = np.any([s.stopped for s in steps], axis=0)
    top = {}
    if steps[0].top_ids is not None:
        top = dict(top_ids=np.zeros((batch, max_new_tokens, steps[0].top_ids.shape[1]), np.int32),
                   top_probs=np.zeros((batch, max_new_tokens, steps[0].top_ids.shape[1]), np.float32))
        for s in steps:
            top["top_ids"][:, s.index], top["top_probs"][:, s.index] = s.top_ids, s.top_probs
    return sample.TokenOutput(tokens, logprobs, (tokens != sample.NO_TOKEN).sum(1), stopped, **top), len(steps)


def assert_same_output(streamed, whole, atol=2e-5):
    np.testing.assert_array_equal(streamed.tokens, whole.tokens)
    np.testing.assert_allclose(streamed.logprobs, whole.logprobs, atol=atol)
    np.testing.assert_array_equal(streamed.lengths, whole.lengths)
    np.testing.assert_array_equal(streamed.stopped, whole.stopped)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_stream_equals_generate_ids_with_stops(models, prompts, greedy, family):
    row0, row1 = greedy[family].tokens[0].tolist(), greedy[family].tokens[1].tolist()
    kwargs = dict(sampling=sample.Sampling(temperature=0), stop_ids=[row0[5]], stop_sequences=[row1[6:8]],
                  top_candidates=3)
    whole = sample.generate_ids(models[family], prompts, jax.random.key(0), NEW, **kwargs)
    streamed, n_steps = collect(sample.stream(models[family], prompts, jax.random.key(0), NEW, **kwargs),
                                len(prompts), NEW)
    assert_same_output(streamed, whole)
    np.testing.assert_array_equal(streamed.top_ids, whole.top_ids)
    np.testing.assert_allclose(streamed.top_probs, whole.top_probs, atol=1e-6)
    assert whole.stopped[0] and n_steps == whole.lengths.max()  # the stream ends when the last row stops
    # and the tokens are the slow, cache-free greedy ones up to each row's stop
    for row, prompt in enumerate(prompts):
        n = whole.lengths[row]
        assert streamed.tokens[row, :n].tolist() == recompute_greedy(models[family], prompt, NEW)[:n]


@pytest.mark.parametrize("sampling", [sample.Sampling(temperature=1.0), sample.Sampling(0.8, top_k=20, top_p=0.9)])
def test_sampled_stream_equals_generate_ids_for_the_same_key(models, prompts, tok, sampling):
    model = models["llama"]
    whole = sample.generate_ids(model, prompts, jax.random.key(5), NEW, sampling, stop_ids=[tok.eot_id])
    streamed, _ = collect(sample.stream(model, prompts, jax.random.key(5), NEW, sampling, stop_ids=[tok.eot_id]),
                          len(prompts), NEW)
    assert_same_output(streamed, whole)
    other = sample.generate_ids(model, prompts, jax.random.key(6), NEW, sampling, stop_ids=[tok.eot_id])
    assert (other.tokens != whole.tokens).any()  # the key matters: the equality above is not vacuous


def test_stream_gives_the_first_token_before_the_rest(models, prompts):
    """The first Step is the prefill's token (the cache-free argmax); the caller may stop there."""
    steps = sample.stream(models["gpt2"], prompts, jax.random.key(0), NEW, sample.Sampling(temperature=0))
    first = next(steps)
    assert first.index == 0 and first.live.all() and not first.stopped.any()
    assert first.tokens.tolist() == [int(jnp.argmax(forward(models["gpt2"], p)[-1])) for p in prompts]
    steps.close()


def test_per_row_temperatures_mix_greedy_and_sampled_rows(models, prompts, greedy):
    model, keys = models["gpt2"], jax.random.split(jax.random.key(9), len(prompts))
    temperatures = [0.0, 1.0, 0.0, 0.7]
    mixed = sample.generate_ids(model, prompts, keys, NEW, sample.Sampling(), temperatures=temperatures)
    streamed, _ = collect(sample.stream(model, prompts, keys, NEW, sample.Sampling(), temperatures=temperatures),
                          len(prompts), NEW)
    assert_same_output(streamed, mixed)
    for row, t in enumerate(temperatures):
        if t == 0:
            np.testing.assert_array_equal(mixed.tokens[row], greedy["gpt2"].tokens[row])
        else:
            alone = sample.generate_ids(model, [prompts[row]], keys[row:row + 1], NEW, sample.Sampling(temperature=t))
            np.testing.assert_array_equal(mixed.tokens[row], alone.tokens[0])
    with pytest.raises(ValueError, match="one temperature >= 0 per prompt"):
        sample.generate_ids(model, prompts, keys, NEW, temperatures=[1.0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_joining_a_running_decode_equal_each_alone(models, family):
    """Slots (continuous batching): rows join a running decode at later steps, into slots other rows left, with
    prompts shorter and longer than their padded length before the cursor, the cache growing in rows and columns;
    each row's tokens and log-probs are the ones generate_ids gives it alone (greedy and sampled rows, shared top-k
    / top-p)."""
    model = models[family]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, n).tolist() for n in (3, 12, 20, 5)]
    new, temperatures = [30, 4, 20, 40], [0.0, 1.0, 0.0, 0.8]
    keys = jax.random.split(jax.random.key(3), len(prompts))
    sampling = sample.Sampling(top_k=20, top_p=0.9)
    alone = [sample.generate_ids(model, [p], keys[i:i + 1], new[i], sampling, temperatures=[temperatures[i]])
             for i, p in enumerate(prompts)]
    slots = sample.Slots(model, max_rows=2, sampling=sampling)
    tokens, logprobs, owner, joined = {}, {}, {}, {}

    def add(i, step):
        [slot], first = slots.add([prompts[i]], keys[i:i + 1], [temperatures[i]], new[i])
        owner[slot], joined[i] = i, step
        tokens[i], logprobs[i] = [int(first.tokens[0])], [float(first.logprobs[0])]

    add(0, 0)
    assert (slots.size, slots.columns) == (1, 64)   # 16 prompt columns + 30 tokens, rounded up
    step = 0
    while owner:
        step += 1
        if step in (1, 5):   # row 1 (shorter than its padding) at once; row 2 (longer) into the slot row 1 left
            add(1 if step == 1 else 2, step)
            assert not slots.can_add(1, slots.index + 1, 1)   # a prompt longer than the columns before the cursor
        if 2 in joined and 3 not in joined and slots.can_add(1, len(prompts[3]), new[3]):
            add(3, step)
        emitted = slots.fetch(slots.step())
        for slot, i in list(owner.items()):
            tokens[i].append(int(emitted.tokens[slot]))
            logprobs[i].append(float(emitted.logprobs[slot]))
            if len(tokens[i]) == new[i]:
                slots.release(slot)
                del owner[slot]
    assert slots.size == 2 and joined[3] == joined[2] + new[2] - 1   # row 3 waited for row 2's slot
    assert slots.columns == 96                      # it needed more columns: grown to the context
    for i, out in enumerate(alone):
        assert tokens[i] == out.tokens[0].tolist(), i
        np.testing.assert_allclose(logprobs[i], out.logprobs[0], atol=1e-5)
    assert len({tuple(t) for t in tokens.values()}) == 4


def test_a_prompt_whose_bucket_passes_the_context_still_decodes(models):
    """max_len 96: a 70-token prompt buckets to 128 slots, more than GPT-2's learned positions; it is padded to the
    context instead, and the tokens equal greedy decoding without a cache."""
    model, n = models["gpt2"], 8
    prompt = np.random.default_rng(0).integers(0, 500, 70).tolist()
    out = sample.generate_ids(model, [prompt], jax.random.key(0), n, sample.Sampling(temperature=0))
    graphdef, state = nnx.split(model)
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, model.spec.max_len), np.int32)
        padded[0, :len(tokens)] = tokens
        tokens.append(int(jnp.argmax(_forward(state, padded, graphdef=graphdef)[0, len(tokens) - 1])))
    assert out.tokens[0].tolist() == tokens[len(prompt):]


def test_score_tokens_equal_a_forward_pass(models, prompts):
    model = models["gpt2"]
    tokens = np.zeros((len(prompts), 16), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    logprobs, is_greedy = map(np.asarray, sample.score_tokens(model, tokens, [len(p) for p in prompts]))
    for row, p in enumerate(prompts):
        np.testing.assert_allclose(logprobs[row, :len(p) - 1], forward_logprobs(model, p[:1], p[1:]), atol=2e-5)
        argmax = np.argmax(np.asarray(forward(model, p)), axis=-1)[:-1]
        np.testing.assert_array_equal(is_greedy[row, :len(p) - 1], argmax == np.array(p[1:]))
        assert (logprobs[row, len(p) - 1:] == 0).all() and not is_greedy[row, len(p) - 1:].any()
    greedy_row = [prompts[0][0]] + recompute_greedy(model, prompts[0][:1], 5)
    assert np.asarray(sample.score_tokens(model, np.array([greedy_row]))[1]).all()


def test_bad_requests_are_clear_errors(models):
    with pytest.raises(ValueError, match="max_len"):
        sample.generate_ids(models["gpt2"], [[1] * 90], jax.random.key(0), 10)
    with pytest.raises(ValueError, match="top_p"):
        sample.Sampling(top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        sample.generate_ids(models["gpt2"], [[]], jax.random.key(0), 4)


# ------------------------------------------------------------------------------------------------ CLI and lm.main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tok):
    """A run directory as lm.train leaves it: a checkpoint of a (random) model and the tokenizer."""
    workdir = tmp_path_factory.mktemp("run")
    config = lm_config.load("configs/tiny.py", {"model.vocab_size": tok.n_vocab, "model.max_len": 96,
                                                "train.seq_len": 64})
    with config.unlocked():
        config.sample.update(max_new_tokens=8, icl_queries=4, icl_shots=(0, 2))
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    checkpoints = checkpoint.Checkpoints(checkpoint.checkpoint_dir(workdir))
    checkpoints.save(3, {"params": params}, {"config": config.to_dict(), "tokenizer_hash": tok.hash})
    checkpoints.close()
    tok.save(workdir / "tokenizer")
    return workdir, config


def run_module(*args):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_prints_only_the_generated_text(workdir, tok):
    """Greedy decoding asked for 3 samples prints one (they would be identical) and says so on stderr."""
    path, _ = workdir
    result = run_module("lm.sample", f"--workdir={path}", "--prompt=The list", "--temperature=0",
                        "--max_new_tokens=6", "--num_samples=3", "--show_probs")
    assert result.returncode == 0, result.stderr[-2000:]
    model, _, _ = checkpoint.load_model(path)
    expected = sample.generate(model, tok, "The list", jax.random.key(0), sample.Sampling(temperature=0),
                               max_new_tokens=6, top_candidates=sample.SHOW_TOP)[0]
    assert result.stdout == expected.text + "\n" + sample.format_probs(tok, expected) + "\n"
    steps = result.stdout.splitlines()[-len(expected.tokens):]
    assert all(" chose " in line and "%" in line for line in steps)
    assert "step 3" in result.stderr  # logs go to stderr
    assert "temperature 0 is greedy: the 3 samples per prompt would be identical; printing one" in result.stderr


def test_icl_cli_prints_the_table(workdir):
    path, _ = workdir
    result = run_module("lm.eval.icl", f"--workdir={path}", "--shots=0,1", "--queries=2")
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((path / "icl.json").read_text())
    assert written["step"] == 3 and written["shots"] == [0, 1]
    assert result.stdout == icl.markdown(written) + "\n"
    assert result.stdout.startswith("choice accuracy") and "| task | 0-shot | 1-shot |" in result.stdout


def test_report_stage(workdir):
    path, config = workdir
    result = eval_report.run(config, path)
    assert {s["temperature"] for s in result["samples"]} == {0.7, 1.0}
    assert all(isinstance(s["text"], str) and s["prompt"] for s in result["samples"])
    assert set(result["icl"]["tasks"]) == {"copy", "upper", "dunder"}
    assert (path / "samples.json").exists() and (path / "icl.json").exists()
    lines = eval_report.markdown(result)
    assert "### In-context learning" in lines and sum(line == "```" for line in lines) == 2 * len(result["samples"])

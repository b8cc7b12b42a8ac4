"""lm.train.losses: the LM loss equals a numpy cross-entropy, and the chunked cross-entropy (train.loss_chunk) gives
the plain path's loss and gradients while its compiled program holds far less than the [B, T, vocab] logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ConfigError
from lm.model import Transformer
from lm.train import losses


def tiny(family, vocab=97):
    return dict(family=family, vocab_size=vocab, n_layers=1, d_model=32, n_heads=4,
                n_kv_heads=4 if family == "gpt2" else 2, d_ff=64, max_len=64, dtype="float32",
                tie_embeddings=family == "gpt2")


def batch(B, T, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return dict(inputs=jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
                targets=jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
                loss_mask=jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32))


def loss_and_grads(model, data, chunk):
    graphdef, state = nnx.split(model)

    def loss(state):
        loss_sum, weight, _ = losses.lm_loss(nnx.merge(graphdef, state), data, chunk=chunk)
        return loss_sum / weight
    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    return float(value), nnx.to_pure_dict(grads)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied LM heads
def test_lm_loss_equals_numpy_cross_entropy(family):
    model = Transformer(tiny(family), rngs=nnx.Rngs(0))
    data = batch(3, 11, 97)
    loss_sum, weight, _ = losses.lm_loss(model, data)
    logits = np.asarray(model(data["inputs"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(data["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(data["loss_mask"])
    assert float(weight) == mask.sum()
    np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_loss_and_gradients_equal_the_plain_path(family):
    """Chunks of 4 and 5 over 13 positions (the last chunk padded), and a chunk as long as the sequence."""
    model = Transformer(tiny(family), rngs=nnx.Rngs(1))
    data = batch(4, 13, 97, seed=1)
    plain_loss, plain_grads = loss_and_grads(model, data, 0)
    for chunk in (4, 5, 13):
        loss, grads = loss_and_grads(model, data, chunk)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6, err_msg=f"chunk {chunk}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"chunk {chunk}"),
                     grads, plain_grads)


def test_chunked_logprobs_equal_token_logprobs_of_the_logits():
    model = Transformer(tiny("llama"), rngs=nnx.Rngs(2))
    data = batch(2, 9, 97, seed=2)
    want = np.asarray(jax.nn.log_softmax(model(data["inputs"]), -1))
    want = np.take_along_axis(want, np.asarray(data["targets"])[..., None], -1)[..., 0]
    got = losses.sequence_token_logprobs(model, data["inputs"], data["targets"], chunk=4)
    assert got.shape == (2, 9) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_chunked_program_never_holds_the_full_logits():
    """vocab 4096 x 64 positions x 8 rows: the float32 logits alone are 8 MiB; with chunks of 8 positions the whole
    forward + backward program needs less temporary memory than one copy of them."""
    vocab, B, T = 4096, 8, 64
    model = Transformer(tiny("llama", vocab=vocab), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    data = batch(B, T, vocab)
    logits_bytes = B * T * vocab * 4

    def temp_bytes(chunk):
        def loss(state):
            return losses.lm_loss(nnx.merge(graphdef, state), data, chunk=chunk)[0]
        return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes(0), temp_bytes(8)
    assert plain > logits_bytes  # the plain path does hold them (and their gradient)
    assert chunked < logits_bytes and chunked < plain / 3, (chunked, plain, logits_bytes)


def test_make_lm_loss_reads_loss_chunk():
    assert losses.make_lm_loss({"loss_chunk": 0}) is losses.lm_loss
    assert losses.make_lm_loss({}) is losses.lm_loss
    assert losses.make_lm_loss({"loss_chunk": 16}).keywords == {"chunk": 16}
    with pytest.raises(ConfigError, match="config.train.loss_chunk=-1"):
        losses.make_lm_loss({"loss_chunk": -1})

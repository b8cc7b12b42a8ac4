"""lm.train.losses: the LM loss equals a numpy cross-entropy, and the chunked cross-entropy (train.loss_chunk) and
the fused one (train.fused_loss, lm.model.head_nll_sum) give the plain path's loss and gradients while their compiled
programs hold far less than the [B, T, vocab] logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import mesh as lm_mesh
from lm.config import ConfigError
from lm.model import Transformer, head_nll_sum, token_logprobs
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


def loss_and_grads(model, data, chunk, fused=False):
    graphdef, state = nnx.split(model)

    def loss(state):
        loss_sum, weight, _ = losses.lm_loss(nnx.merge(graphdef, state), data, chunk=chunk, fused=fused)
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

    def temp_bytes(chunk, fused=False):
        def loss(state):
            return losses.lm_loss(nnx.merge(graphdef, state), data, chunk=chunk, fused=fused)[0]
        return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes

    plain, chunked, fused = temp_bytes(0), temp_bytes(8), temp_bytes(8, fused=True)
    assert plain > logits_bytes  # the plain path does hold them (and their gradient)
    assert chunked < logits_bytes and chunked < plain / 3, (chunked, plain, logits_bytes)
    assert fused < logits_bytes and fused < plain / 3, (fused, plain, logits_bytes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied LM heads
def test_fused_loss_and_gradients_equal_the_plain_path(family):
    """Chunks of 4 and 5 over 13 positions (the last chunk padded), one as long as the sequence, one longer; a
    loss mask with zeros; the value without differentiation too."""
    model = Transformer(tiny(family), rngs=nnx.Rngs(1))
    data = batch(4, 13, 97, seed=1)
    plain_loss, plain_grads = loss_and_grads(model, data, 0)
    for chunk in (4, 5, 13, 32):
        loss, grads = loss_and_grads(model, data, chunk, fused=True)
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-6, err_msg=f"chunk {chunk}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"chunk {chunk}"),
                     grads, plain_grads)
        loss_sum, weight, _ = losses.lm_loss(model, data, chunk=chunk, fused=True)
        np.testing.assert_allclose(float(loss_sum / weight), plain_loss, rtol=1e-6)


def test_fused_head_nll_gradients_equal_autodiff_with_weighted_rows():
    """head_nll_sum alone, against jax.grad of the plain formula: non-binary row weights, an outer scale (the
    cotangent), hidden and weight both differentiated."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 7)) * (rng.random((3, 7)) > 0.2), jnp.float32)

    def plain(h, w):
        logprobs = token_logprobs(jnp.einsum("btd,vd->btv", h, w), targets)
        return -2.5 * jnp.sum(logprobs * mask)

    def fused(h, w):
        return 2.5 * head_nll_sum(h, w, targets, mask, chunk=3)

    want, got = jax.value_and_grad(plain, (0, 1))(hidden, weight), jax.value_and_grad(fused, (0, 1))(hidden, weight)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_fused_loss_in_bfloat16_is_close_to_the_plain_path():
    """bf16 compute (float32 params): the fused path's loss and gradients stay within bf16 rounding of the plain
    path's in the same dtype."""
    model = Transformer(dict(tiny("llama"), dtype="bfloat16"), rngs=nnx.Rngs(4))
    data = batch(4, 13, 97, seed=4)
    plain_loss, plain_grads = loss_and_grads(model, data, 0)
    loss, grads = loss_and_grads(model, data, 5, fused=True)
    np.testing.assert_allclose(loss, plain_loss, rtol=2e-3)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(plain_grads)):
        assert g.dtype == w.dtype
        scale = np.abs(w).max() + 1e-6
        np.testing.assert_allclose(g / scale, w / scale, atol=3e-2, err_msg=str(path))


def test_make_lm_loss_reads_loss_chunk():
    assert losses.make_lm_loss({"loss_chunk": 0}) is losses.lm_loss
    assert losses.make_lm_loss({}) is losses.lm_loss
    assert losses.make_lm_loss({"loss_chunk": 16}).keywords == {"chunk": 16}
    with pytest.raises(ConfigError, match="config.train.loss_chunk=-1"):
        losses.make_lm_loss({"loss_chunk": -1})
    assert losses.make_lm_loss({"fused_loss": True}).keywords == {"chunk": 0, "fused": True}
    assert losses.make_lm_loss({"fused_loss": True, "loss_chunk": 64}).keywords == {"chunk": 64, "fused": True}


def test_fused_loss_with_rows_sharded_over_a_mesh_equals_one_device():
    """The batch's rows sharded over data=2 x fsdp=2 (4 host devices): the same loss and gradients."""
    model = Transformer(tiny("gpt2"), rngs=nnx.Rngs(5))
    data = batch(4, 13, 97, seed=5)
    want_loss, want_grads = loss_and_grads(model, data, 5, fused=True)
    mesh = lm_mesh.make_mesh(dict(data=2, fsdp=2, tensor=1), jax.devices()[:4])
    with jax.set_mesh(mesh):
        rows = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
        sharded = {k: jax.device_put(v, rows) for k, v in data.items()}
        loss, grads = loss_and_grads(model, sharded, 5, fused=True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want_grads)

"""The Transformer: shapes, causality, KV cache and left padding, scan / remat / attention paths, sharded init, FLOPs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import mesh as lm_mesh
from lm.config import ConfigError
from lm.model import (Transformer, cache_shardings, flops_per_token, from_params, param_count, shardings, stack_layers,
                      unstack_layers)
from lm.model import reductions
from lm.model.layers import add_bias, apply_gain, attention, dense

FAMILIES = ("gpt2", "llama")
T = 14  # one sequence length for the full forward passes, so compiled functions are shared between tests


def tiny(family, **overrides):
    config = dict(family=family, vocab_size=128, n_layers=2, d_model=64, n_heads=4,
                  n_kv_heads=4 if family == "gpt2" else 2, d_ff=128, max_len=32, dtype="float32",
                  param_dtype="float32", attention="xla", remat="none", scan_layers=False, rope_theta=10000.0,
                  norm_eps=1e-5, tie_embeddings=family == "gpt2")
    config.update(overrides)
    return config


def tokens(shape, seed=0, vocab=128):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.cache
def make(family, **overrides):
    """A (shared, never mutated) model with noise on every param, so zero biases and unit norms take part."""
    if overrides.get("scan_layers"):  # the same params, stacked
        params = nnx.to_pure_dict(nnx.state(make(family)))
        return from_params(tiny(family, **overrides), stack_layers(params))
    graphdef, state = nnx.split(Transformer(tiny(family, **overrides), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), state)
    return nnx.merge(graphdef, state)


# Module-level jitted functions with the graphdef static: equal configs reuse one compilation.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, positions=None):
    return nnx.merge(graphdef, state)(x, positions=positions)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, x, cache, positions=None):
    return nnx.merge(graphdef, state)(x, positions=positions, cache=cache)


def forward(model, x, positions=None):
    return np.asarray(_forward(*nnx.split(model), x, positions))


def decode(model, x, cache, positions=None):
    return _decode(*nnx.split(model), x, cache, positions)


def test_param_count_matches_the_model():
    for family in FAMILIES:
        for tied in (True, False):
            config = tiny(family, tie_embeddings=tied)
            params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
            assert sum(x.size for x in jax.tree.leaves(params)) == param_count(config)
            assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_bfloat16_compute_tracks_float32():
    model = make("llama")
    bf16 = from_params(tiny("llama", dtype="bfloat16"), nnx.to_pure_dict(nnx.state(model)))
    x = tokens((2, T))
    logits = _forward(*nnx.split(bf16), x)
    assert logits.shape == (2, T, 128) and logits.dtype == jnp.float32
    assert bf16.blocks[0].attn.q[...].dtype == jnp.float32  # params stay float32
    np.testing.assert_allclose(logits, forward(model, x), atol=0.1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bias_and_gain_gradients_equal_plain_autodiff(dtype):
    """add_bias / apply_gain (their parameter gradients a matmul with ones) against jax.grad of y + b and y * g, with
    a [heads, head_dim] bias as the attention's and a cotangent that is not all ones."""
    y = jax.random.normal(jax.random.key(0), (3, 5, 4, 8), dtype)
    b = jax.random.normal(jax.random.key(1), (4, 8), jnp.float32)
    w = jax.random.normal(jax.random.key(2), y.shape, jnp.float32)

    def loss(f):
        return lambda y, b: jnp.sum(jnp.sin(f(y, b).astype(jnp.float32)) * w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for ours, plain in ((add_bias, lambda y, b: y + b.astype(y.dtype)), (apply_gain, lambda y, b: y * b.astype(y.dtype))):
        np.testing.assert_allclose(np.asarray(ours(y, b), np.float32), np.asarray(plain(y, b), np.float32), **tol)
        got, want = jax.grad(loss(ours), (0, 1))(y, b), jax.grad(loss(plain), (0, 1))(y, b)
        for g, e in zip(got, want):
            assert g.dtype == e.dtype and g.shape == e.shape
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), **tol)


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_bfloat16_dense_rounds_a_float32_product_once(rows):
    """dense in bfloat16 (on CPU a bf16 x bf16 -> f32 matmul rounded back) against numpy's float32 product of the
    same bf16 values rounded once to bf16; its gradients keep the operands' dtypes and track float32 autodiff."""
    x = jax.random.normal(jax.random.key(0), (2, rows, 96), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (96, 40), jnp.bfloat16)
    want = (np.asarray(x, np.float32) @ np.asarray(w, np.float32)).astype(jnp.bfloat16)
    for flat in (False, True):
        y = dense(x, w, flat=flat)
        assert y.dtype == jnp.bfloat16 and y.shape == (2, rows, 40)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=8e-3, atol=1e-6)
    cotangent = jax.random.normal(jax.random.key(2), (2, rows, 40), jnp.float32)
    loss = lambda f: (lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cotangent))
    got = jax.grad(loss(lambda x, w: dense(x, w, flat=True)), (0, 1))(x, w)
    exact = jax.grad(loss(lambda x, w: x @ w), (0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    for g, e in zip(got, exact):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e), rtol=2e-2, atol=2e-2 * float(jnp.abs(e).max()))


@pytest.mark.parametrize("shape", [(4, 64, 2048), (3, 1000, 160), (2, 5, 7)])  # folded, odd after a fold, small
def test_row_reductions_equal_jax_nn(shape):
    """reductions.row_max / row_sum / logsumexp / softmax (folded maxima and sums as matmuls on CPU for large
    arrays) against jnp.max, jnp.sum and jax.nn, values and gradients; a row of -inf has logsumexp -inf."""
    x = 5 * jax.random.normal(jax.random.key(0), shape)
    assert (x.size >= reductions.MIN_SIZE) == (shape != (2, 5, 7))
    np.testing.assert_array_equal(reductions.row_max(x), jnp.max(x, axis=-1))
    np.testing.assert_allclose(reductions.row_sum(x), jnp.sum(x, axis=-1), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(reductions.logsumexp(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(reductions.softmax(x), jax.nn.softmax(x, axis=-1), rtol=1e-5, atol=1e-7)
    w = jax.random.normal(jax.random.key(1), shape)
    for ours, ref, weight in ((reductions.logsumexp, lambda x: jax.nn.logsumexp(x, axis=-1), w[..., 0]),
                              (reductions.softmax, lambda x: jax.nn.softmax(x, axis=-1), w)):
        got, want = (jax.grad(lambda x, f=f: jnp.sum(f(x) * weight))(x) for f in (ours, ref))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert reductions.logsumexp(x.at[-1, -1].set(-jnp.inf))[-1, -1] == -jnp.inf


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_future_tokens_never_change_past_logits(family):
    model = make(family)
    x = tokens((2, T))
    base = forward(model, x)
    for t in (0, 5, T - 1):
        out = forward(model, x.at[:, t].set((x[:, t] + 7) % 128))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_attention_matches_numpy_reference():
    rng = np.random.default_rng(0)
    B, S, H, K, D = 2, 6, 4, 2, 8
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((B, S, H, D), (B, S, K, D), (B, S, K, D)))
    mask = np.tril(np.ones((S, S), bool))[None] & (rng.random((B, 1, S)) > 0.3)
    mask[:, :, 0] = True  # every query sees at least one key
    # Reference: repeat each kv head over its group of query heads, plain masked softmax.
    kr, vr = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(D)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", probs, vr)
    run = jax.jit(attention, static_argnums=4)
    causal = np.tril(np.ones((S, S), bool))[None].repeat(B, 0)
    for implementation in ("xla", "dot_product"):
        np.testing.assert_allclose(run(q, k, v, mask, implementation), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(run(q, k, v, None, implementation), run(q, k, v, causal, "xla"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_and_dot_product_attention_give_the_same_logits(family):
    config = tiny(family)
    model = make(family)
    params = nnx.to_pure_dict(nnx.state(model))
    x = tokens((2, T))
    base = forward(model, x)
    scanned = make(family, scan_layers=True)
    np.testing.assert_allclose(forward(scanned, x), base, rtol=1e-5, atol=1e-5)
    dot_product = from_params(tiny(family, attention="dot_product"), params)
    np.testing.assert_allclose(forward(dot_product, x), base, rtol=1e-5, atol=1e-5)
    # And back: the scanned params unstack to the unrolled ones.
    back = unstack_layers(nnx.to_pure_dict(nnx.state(scanned)), config["n_layers"])
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_remat_and_scan_give_the_same_gradients():
    params = nnx.to_pure_dict(nnx.state(make("llama")))
    x = tokens((2, T))
    weights = jax.random.normal(jax.random.key(2), (2, T, 128))

    def loss_and_grads(overrides):
        graphdef, state = nnx.split(from_params(tiny("llama", **overrides),
                                                stack_layers(params) if overrides.get("scan_layers") else params))
        loss = lambda s: (nnx.merge(graphdef, s)(x) * weights).sum()  # noqa: E731
        value, grads = jax.jit(jax.value_and_grad(loss))(state)
        grads = nnx.to_pure_dict(grads)
        return value, unstack_layers(grads, 2) if overrides.get("scan_layers") else grads

    base_loss, base_grads = loss_and_grads({})
    for overrides in (dict(remat="dots", scan_layers=True),):  # "full" differs only in the checkpoint policy
        loss, grads = loss_and_grads(overrides)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-5, err_msg=str(overrides))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(overrides)),
                     grads, base_grads)


@pytest.mark.parametrize("family, scan", [("gpt2", False), ("llama", False), ("llama", True)])
def test_kv_cache_decoding_equals_full_forward(family, scan):
    model = make(family, scan_layers=scan)
    x = tokens((2, T))
    full = forward(model, x)
    cache = model.init_cache(2, 16)
    logits, cache = decode(model, x[:, :7], cache)  # prefill
    pieces = [logits]
    for t in range(7, T):
        logits, cache = decode(model, x[:, t:t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == T
    np.testing.assert_array_equal(cache["pos"], np.where(np.arange(16) < T, np.arange(16), -1)[None].repeat(2, 0))


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(family):
    """Prompts of lengths 7 and 4, the second left padded to 7, then 3 decoded tokens each."""
    model = make(family)
    rows = tokens((2, T), seed=1)
    want = forward(model, rows)  # each row alone, unpadded
    pad = 3
    prompts = jnp.stack([rows[0, :7], jnp.pad(rows[1, :4], (pad, 0))])
    positions = jnp.stack([jnp.arange(7), jnp.arange(7) - pad])  # padding: negative positions
    full = forward(model, prompts, positions)
    np.testing.assert_allclose(full[0], want[0, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full[1, pad:], want[1, :4], rtol=1e-5, atol=1e-5)

    logits, cache = decode(model, prompts, model.init_cache(2, 16), positions)
    np.testing.assert_allclose(logits[1, pad:], want[1, :4], rtol=1e-5, atol=1e-5)
    for i in range(3):  # default positions continue each row from its own last position
        logits, cache = decode(model, jnp.stack([rows[0, 7 + i], rows[1, 4 + i]])[:, None], cache)
        np.testing.assert_allclose(logits[0, 0], want[0, 7 + i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits[1, 0], want[1, 4 + i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(tokens((2, 7)), cache=cache)


def test_init_sharded_on_2x2x2_mesh():
    config = tiny("llama")
    mesh = lm_mesh.make_mesh(dict(data=2, fsdp=2, tensor=2))
    init = lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)))  # noqa: E731
    graphdef, abstract = nnx.eval_shape(init)
    x = tokens((4, T))
    with jax.set_mesh(mesh):
        _, state = jax.jit(init, out_shardings=(None, shardings(abstract, mesh)))()
        logits = _forward(graphdef, state, x)
    for path, variable in nnx.to_flat_state(state):
        want = lm_mesh.logical_to_spec(variable.get_metadata()["logical_axes"], variable.shape, mesh)
        assert variable[...].sharding.spec == want, path
    assert state["blocks"][1]["attn"]["k"][...].sharding.spec == jax.P("fsdp", "tensor", None)
    assert state["embed"][...].sharding.spec == jax.P("tensor", "fsdp")
    unsharded = forward(Transformer(config, rngs=nnx.Rngs(0)), x)
    np.testing.assert_allclose(np.asarray(logits), unsharded, rtol=1e-5, atol=1e-5)


def test_shardings_follow_the_rules_table():
    mesh = lm_mesh.make_mesh(dict(data=2, fsdp=2, tensor=2))
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(tiny("gpt2", vocab_size=127), rngs=nnx.Rngs(0))))
    specs = {"/".join(map(str, path)): s.spec for path, s in nnx.to_flat_state(shardings(abstract, mesh))}
    assert specs["embed"] == jax.P(None, "fsdp")  # 127 rows do not split over tensor=2: replicated
    assert specs["pos_embed"] == jax.P(None, "fsdp")
    assert specs["blocks/0/attn/q"] == jax.P("fsdp", "tensor", None)
    assert specs["blocks/0/attn/q_bias"] == jax.P("tensor", None)
    assert specs["blocks/1/attn/o"] == jax.P("tensor", None, "fsdp")
    assert specs["blocks/1/mlp/up"] == jax.P("fsdp", "tensor")
    assert specs["blocks/1/mlp_norm/scale"] == jax.P(None)
    scanned = nnx.state(nnx.eval_shape(lambda: Transformer(tiny("llama", scan_layers=True), rngs=nnx.Rngs(0))))
    specs = {"/".join(map(str, path)): s.spec for path, s in nnx.to_flat_state(shardings(scanned, mesh))}
    assert specs["blocks/attn/k"] == jax.P(None, "fsdp", "tensor", None)  # the stacked `layers` axis: replicated
    assert specs["head"] == jax.P("fsdp", "tensor")
    cache = Transformer(tiny("gpt2"), rngs=nnx.Rngs(0)).init_cache(4, 16)
    assert [s.spec for s in cache_shardings(cache, mesh)["k"]] == [jax.P(("data", "fsdp"), "tensor", None, None)] * 2
    cache = Transformer(tiny("llama", scan_layers=True), rngs=nnx.Rngs(0)).init_cache(4, 16)
    assert cache_shardings(cache, mesh)["v"].spec == jax.P(None, ("data", "fsdp"), "tensor", None, None)


def test_flops_per_token_matches_xla_cost_analysis():
    """6N + 12 L H Q T against XLA's count for a forward pass (x3 for forward + backward)."""
    config = tiny("gpt2", vocab_size=512, max_len=128)
    seq_len = 128
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    cost = _forward.lower(graphdef, state, tokens((1, seq_len))).compile().cost_analysis()
    xla = 3 * cost["flops"] / seq_len  # XLA also counts elementwise work (norms, GELU, softmax): a little more
    assert 0.95 * xla < flops_per_token(config, seq_len) <= xla


def test_gpt2_124m_numbers():
    config = dict(family="gpt2", vocab_size=50304, n_layers=12, d_model=768, n_heads=12, n_kv_heads=12,
                  d_ff=3072, max_len=1024, tie_embeddings=True)
    assert param_count(config) == 124_475_904  # nanoGPT's GPT-2 with the vocabulary padded to 50304
    non_embedding = param_count(config, include_embeddings=False)
    assert non_embedding == 85_056_000
    assert flops_per_token(config, 1024) == 6 * (non_embedding + 768 * 50304) + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("key, value, words", [("family", "bert", "'gpt2' or 'llama'"),
                                                ("vocab_size", 0, "resolved from the tokenizer"),
                                                ("n_kv_heads", 3, "a divisor of n_heads"),
                                                ("remat", "some", "'none', 'full' or 'dots'")])
def test_bad_config_names_the_key(key, value, words):
    with pytest.raises(ConfigError, match=f"config.model.{key}=.*{words}"):
        Transformer({**tiny("llama"), key: value}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_then_logits_is_the_forward_pass(family):
    model = make(family)
    x = tokens((2, T))
    hidden = nnx.jit(lambda m, x: m.hidden(x))(model, x)
    assert hidden.shape == (2, T, 64)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, hidden)), forward(model, x))
    # The LM head by hand: tied (GPT-2) reads the embedding table, untied (LLaMA) its own head.
    head = model.embed[...].T if model.head is None else model.head[...]
    np.testing.assert_allclose(np.asarray(hidden) @ np.asarray(head), forward(model, x), rtol=1e-4, atol=1e-4)


def test_scalar_head_reads_each_rows_last_real_token():
    """Right-padded rows of lengths 5 and 9: each score equals w . h + b of that row's last real token, computed
    from the row alone (padding after it changes nothing); the last column is not read."""
    from lm.model import TransformerWithScalarHead, at_positions, last_token_index

    config = tiny("llama")
    model = TransformerWithScalarHead(config, rngs=nnx.Rngs(0), head_init_std=0.5)
    model.scalar_head.bias[...] = jnp.float32(0.25)
    rows = tokens((2, 9), seed=3)
    lengths = jnp.array([5, 9])
    scores = np.asarray(nnx.jit(lambda m, x, n: m.scores(x, n))(model, rows, lengths))
    w, b = np.asarray(model.scalar_head.weight[...]), 0.25
    for row, n in enumerate((5, 9)):
        alone = np.asarray(nnx.jit(lambda m, x: m.hidden(x))(model, rows[row:row + 1, :n]))[0]
        np.testing.assert_allclose(scores[row], alone[n - 1] @ w + b, rtol=1e-5, atol=1e-6)
    padded_last = np.asarray(nnx.jit(lambda m, x: m.values(x))(model, rows))[0, -1]
    assert not np.isclose(scores[0], padded_last)
    np.testing.assert_array_equal(last_token_index(jnp.array([0, 1, 7])), [0, 0, 6])
    values = jnp.arange(12.0).reshape(2, 3, 2)
    np.testing.assert_array_equal(at_positions(values, jnp.array([2, 0])), [[4, 5], [6, 7]])
    # A fresh head (the default) scores every row 0; the trunk's paths are a plain Transformer's plus scalar_head.
    fresh = TransformerWithScalarHead(config, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(fresh.scores(rows, lengths)), [0.0, 0.0])
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(fresh, nnx.Param))}
    plain = {p for p, _ in nnx.to_flat_state(nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param))}
    assert paths - plain == {("scalar_head", "weight"), ("scalar_head", "bias")} and plain < paths


@pytest.mark.parametrize("family", FAMILIES)
def test_levers_on_a_2x2x2_mesh_equal_the_unsharded_base(family):
    """fused_qkv concatenates weights split over `tensor`, flat_matmuls merges the `batch`-sharded rows with the
    length: both under a data x fsdp x tensor mesh, with blockwise attention, equal the plain unsharded model."""
    levers = dict(attention="blockwise", attention_block=5, fused_qkv=True, flat_matmuls=True)
    params = nnx.to_pure_dict(nnx.state(make(family)))
    model = from_params(tiny(family, **levers), params)
    graphdef, state = nnx.split(model)
    mesh = lm_mesh.make_mesh(dict(data=2, fsdp=2, tensor=2))
    x = tokens((4, T))
    with jax.set_mesh(mesh):
        state = jax.device_put(state, shardings(state, mesh))
        logits = _forward(graphdef, state, x)
    np.testing.assert_allclose(np.asarray(logits), forward(make(family), x), rtol=1e-5, atol=1e-5)

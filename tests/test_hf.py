"""HF transformers parity: random small GPT2LMHeadModel / LlamaForCausalLM give our logits (float32, 1e-4), both ways."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.model import hf
from lm.model import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T = 97, 12


def hf_model(family):
    """A random-init HF model on CPU, with noise on every weight so biases and norm gains are not trivial."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          rms_norm_eps=1e-5, attn_implementation="eager",
                                          rope_parameters=dict(rope_type="default", rope_theta=500.0))
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def our_logits(model, tokens):
    return np.asarray(_forward(*nnx.split(model), tokens))


def random_tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, T)), jnp.int32)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_from_hf(family):
    theirs = hf_model(family)
    config, ours = hf.load_hf(theirs.state_dict(), family, hf_config=theirs.config)
    assert config.vocab_size == VOCAB and config.tie_embeddings == (family == "gpt2")
    if family == "llama":
        assert (config.n_kv_heads, config.rope_theta, config.norm_eps) == (2, 500.0, 1e-5)
    x = random_tokens()
    np.testing.assert_allclose(our_logits(ours, x), hf_logits(theirs, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_to_hf_and_back(family, tmp_path):
    config = dict(family=family, vocab_size=VOCAB, n_layers=2, d_model=64, n_heads=4,
                  n_kv_heads=4 if family == "gpt2" else 2, d_ff=128, max_len=32, dtype="float32",
                  rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=family == "gpt2")
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    ours = nnx.merge(graphdef, jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), state))
    hf.export_hf(ours, config, tmp_path, eos_token_id=0)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 0
    model_class = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    theirs = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = random_tokens(seed=2)
    want = our_logits(ours, x)
    np.testing.assert_allclose(hf_logits(theirs, x), want, rtol=1e-4, atol=1e-4)
    # And back from the directory (config.json + model.safetensors); LLaMA into the scan-over-layers layout.
    loaded_config, loaded = hf.load_hf(tmp_path, scan_layers=family == "llama")
    assert loaded_config.family == family and loaded_config.scan_layers == (family == "llama")
    np.testing.assert_allclose(our_logits(loaded, x), want, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_named():
    theirs = hf_model("llama")
    state_dict = dict(theirs.state_dict(), **{"model.layers.9.extra.weight": torch.zeros(3)})
    with pytest.raises(hf.HFError, match="unexpected tensors.*layers.9.extra"):
        hf.load_hf(state_dict, "llama", hf_config=theirs.config)
    with pytest.raises(hf.HFError, match="needs hf_config"):
        hf.load_hf(theirs.state_dict(), "llama")
    with pytest.raises(hf.HFError, match="rope scaling"):
        hf.config_from_hf(dict(theirs.config.to_dict(), rope_parameters=dict(rope_type="linear", factor=2.0)))

"""HF transformers parity: random small GPT2LMHeadModel / LlamaForCausalLM give our logits (float32, 1e-4), both ways."""
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint
from lm import hf as lm_hf
from lm.model import hf
from lm.model import Transformer
from tests.conftest import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T = 97, 12


def hf_model(family, vocab=VOCAB):
    """A random-init HF model on CPU, with noise on every weight so biases and norm gains are not trivial."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=32,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
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


# --- an HF directory imported as an lm run (python -m lm.hf --from_hf=DIR --to_run=W) --------------------------------

@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    """Our 300-token BPE (chat tokens included) and its HF tokenizer.json, as a model's HF directory carries it."""
    from lm.eval import tasks
    from lm.tokenizer import train as tokenizer_train
    texts = [e.prompt[0]["content"] + " " + e.thinking for e in tasks.Arithmetic().examples("train", 200)]
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer_train.train([" ".join(texts)], 300, directory)
    return directory


def hf_directory(directory, family, tokenizer_json: dict):
    """A random HF model saved with save_pretrained beside `tokenizer_json`, sized to its vocabulary."""
    theirs = hf_model(family, vocab=len(tokenizer_json["model"]["vocab"]))
    theirs.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return theirs


def without_chat_tokens(tokenizer_json: dict) -> dict:
    """A tokenizer.json with only <|endoftext|> as special token, as GPT-2's (the chat tokens are our last ids)."""
    chat = {t["content"] for t in tokenizer_json["added_tokens"] if t["content"] != "<|endoftext|>"}
    data = json.loads(json.dumps(tokenizer_json))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in chat]
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k not in chat}
    return data


@pytest.mark.parametrize("family,chat_tokens", [("gpt2", False), ("llama", True), ("llama", False)])
def test_import_hf_directory_as_a_run(family, chat_tokens, trained_tokenizer, tmp_path):
    """load_run of the imported run gives HF's logits (1e-4) and a tokenizer with HF `tokenizers`' ids. Without our
    chat tokens in tokenizer.json they are appended and the embedding grows by as many rows (GPT-2: tied; LLaMA: the
    head too), the original ids' logits unchanged."""
    from tokenizers import Tokenizer as HFTokenizer
    tokenizer_json = json.loads((trained_tokenizer / "tokenizer.json").read_text())
    if not chat_tokens:
        tokenizer_json = without_chat_tokens(tokenizer_json)
    theirs = hf_directory(tmp_path / "hf", family, tokenizer_json)
    vocab = theirs.config.vocab_size
    lm_hf.import_run(tmp_path / "hf", tmp_path / "run")
    ours, tok, config, meta = checkpoint.load_run(tmp_path / "run")
    assert meta["objective"] == "hf_import" and config.model.family == family
    assert tok.n_vocab == config.model.vocab_size == 300 and (vocab == 300) == chat_tokens
    assert tok.token_id("<|assistant_start|>") < tok.n_vocab
    text = "What is 12 + 34? 46, hello world."
    assert tok.encode(text) == HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(text).ids
    x = jnp.asarray(np.random.default_rng(3).integers(0, vocab, (2, T)), jnp.int32)
    got = our_logits(ours, x)
    np.testing.assert_allclose(got[..., :vocab], hf_logits(theirs, x), rtol=1e-4, atol=1e-4)
    assert got.shape[-1] == 300


def test_import_cli_and_a_grpo_run_from_it(trained_tokenizer, tmp_path):
    """The one command, then GRPO with --config.grpo.init_from=W for 2 steps from the imported LLaMA; a directory
    without tokenizer.json is an error naming the file."""
    from lm import config as lm_config
    from lm.train import grpo
    hf_directory(tmp_path / "hf", "llama", json.loads((trained_tokenizer / "tokenizer.json").read_text()))
    out = subprocess.run([sys.executable, "-m", "lm.hf", f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'w'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported" in out.stdout and "llama" in out.stdout
    overrides = {"grpo.init_from": str(tmp_path / "w"), "grpo.prompts": 2, "grpo.group_size": 4,
                 "grpo.prompt_len": 24, "grpo.max_new_tokens": 4, "grpo.minibatches": 1, "grpo.train_problems": 16,
                 "grpo.eval_problems": 0, "train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2,
                 "mesh.data": 8}
    summary = grpo.run(lm_config.load("configs/grpo_tiny.py", overrides), tmp_path / "g")
    assert summary["steps"] == 2
    assert checkpoint.load_run(tmp_path / "g" / "grpo")[3]["init_from"]["objective"] == "hf_import"
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        lm_hf.import_run(tmp_path / "hf", tmp_path / "w2")

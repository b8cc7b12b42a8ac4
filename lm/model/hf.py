"""Import from and export to HF transformers `GPT2LMHeadModel` and `LlamaForCausalLM` (state dicts, safetensors).

    model_config, model = load_hf("path/to/hf_dir")          # config.json + *.safetensors
    model_config, model = load_hf(torch_model.state_dict(), "llama", hf_config=torch_model.config)
    export_hf(model, model_config, "out_dir")                # loadable by `AutoModelForCausalLM.from_pretrained`

Neither torch nor transformers is needed here: tensors are read and written with safetensors, and torch tensors in a
state dict are converted by duck typing. Layout differences: HF GPT-2's Conv1D stores [in, out] like us with q, k, v
fused; HF LLaMA's Linear stores [out, in]; both split heads as [heads, head_dim] on the feature axis, and HF LLaMA's
RoPE is the half-split form `lm.model.layers.apply_rope` uses, so no permutation is needed.

It needs only lm.model, so anything above the model may use it; its CLI (which reads run checkpoints) is lm.hf:
      python -m lm.hf --from_hf=DIR                  load an HF checkpoint, print its config and a forward pass
      python -m lm.hf --workdir=W --to_hf=DIR        export the latest checkpoint of a run in HF format
"""
import json
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from lm.model import Transformer, from_params, param_count, stack_layers, unstack_layers
from lm.model.transformer import ModelSpec

# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFError(ValueError):
    """An HF checkpoint or config this module cannot map exactly onto our Transformer."""


# ----------------------------------------------------------------------------------------------- configs


def config_from_hf(hf_config: dict, family: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """Our `config.model` from an HF config dict (float32 compute unless overridden, e.g. dtype="bfloat16")."""
    family = family or {"gpt2": "gpt2", "llama": "llama"}.get(hf_config.get("model_type"))
    if family == "gpt2":
        c = _gpt2_config(hf_config)
    elif family == "llama":
        c = _llama_config(hf_config)
    else:
        raise HFError(f"unknown family {family!r} (model_type {hf_config.get('model_type')!r}): gpt2 or llama")
    c.update(dtype="float32", param_dtype="float32", attention="xla", remat="none", scan_layers=False)
    c.update(overrides)
    ModelSpec.from_config(c)  # checks
    return ml_collections.ConfigDict(c)


def _gpt2_config(h):
    if h.get("activation_function", "gelu_new") not in _GELU_TANH:
        raise HFError(f"GPT-2 activation_function={h['activation_function']!r}: only the tanh GELU is supported")
    if h.get("scale_attn_by_inverse_layer_idx") or not h.get("scale_attn_weights", True):
        raise HFError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    d = h["n_embd"]
    return dict(family="gpt2", vocab_size=h["vocab_size"], n_layers=h["n_layer"], d_model=d, n_heads=h["n_head"],
                n_kv_heads=h["n_head"], d_ff=h.get("n_inner") or 4 * d, max_len=h["n_positions"],
                rope_theta=10000.0, norm_eps=h.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=h.get("tie_word_embeddings", True))


def _llama_config(h):
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFError(f"LLaMA rope scaling {rope} is not supported (only the default RoPE)")
    if h.get("hidden_act", "silu") != "silu" or h.get("attention_bias") or h.get("mlp_bias"):
        raise HFError("LLaMA variants with biases or an activation other than silu are not supported")
    d, n_heads = h["hidden_size"], h["num_attention_heads"]
    if h.get("head_dim") not in (None, d // n_heads):
        raise HFError(f"LLaMA head_dim={h['head_dim']} != hidden_size / num_attention_heads = {d // n_heads}")
    return dict(family="llama", vocab_size=h["vocab_size"], n_layers=h["num_hidden_layers"], d_model=d,
                n_heads=n_heads, n_kv_heads=h.get("num_key_value_heads") or n_heads, d_ff=h["intermediate_size"],
                max_len=h["max_position_embeddings"], rope_theta=float(rope.get("rope_theta", h.get("rope_theta",
                                                                                                   10000.0))),
                norm_eps=h.get("rms_norm_eps", 1e-6), tie_embeddings=h.get("tie_word_embeddings", False))


def config_to_hf(model_config) -> dict:
    """The HF config.json dict for our `config.model` (no bos/eos ids: pass the tokenizer's to `export_hf`)."""
    s = ModelSpec.from_config(model_config)
    if s.family == "gpt2":
        if s.n_kv_heads != s.n_heads:
            raise HFError("GPT2LMHeadModel has no grouped-query attention: n_kv_heads must equal n_heads")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=s.vocab_size,
                    n_positions=s.max_len, n_embd=s.d_model, n_layer=s.n_layers, n_head=s.n_heads, n_inner=s.d_ff,
                    activation_function="gelu_new", layer_norm_epsilon=s.norm_eps,
                    tie_word_embeddings=s.tie_embeddings, bos_token_id=None, eos_token_id=None, dtype="float32")
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=s.vocab_size,
                hidden_size=s.d_model, intermediate_size=s.d_ff, num_hidden_layers=s.n_layers,
                num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
                max_position_embeddings=s.max_len, rms_norm_eps=s.norm_eps, hidden_act="silu",
                rope_parameters=dict(rope_type="default", rope_theta=s.rope_theta), rope_theta=s.rope_theta,
                attention_bias=False, mlp_bias=False, tie_word_embeddings=s.tie_embeddings, bos_token_id=None,
                eos_token_id=None, dtype="float32")


# ----------------------------------------------------------------------------------------------- GPT-2 tensors


def _gpt2_from_hf(sd, s):
    d, h, hd = s.d_model, s.n_heads, s.head_dim
    params = dict(embed=sd.pop("wte.weight"), pos_embed=sd.pop("wpe.weight"),
                  final_norm=_layer_norm(sd, "ln_f"), blocks={})
    for i in range(s.n_layers):
        p = f"h.{i}."
        q, k, v = np.split(sd.pop(p + "attn.c_attn.weight"), 3, axis=1)
        qb, kb, vb = np.split(sd.pop(p + "attn.c_attn.bias"), 3)
        attn = dict(q=q.reshape(d, h, hd), k=k.reshape(d, h, hd), v=v.reshape(d, h, hd),
                    q_bias=qb.reshape(h, hd), k_bias=kb.reshape(h, hd), v_bias=vb.reshape(h, hd),
                    o=sd.pop(p + "attn.c_proj.weight").reshape(h, hd, d), o_bias=sd.pop(p + "attn.c_proj.bias"))
        mlp = dict(up=sd.pop(p + "mlp.c_fc.weight"), up_bias=sd.pop(p + "mlp.c_fc.bias"),
                   down=sd.pop(p + "mlp.c_proj.weight"), down_bias=sd.pop(p + "mlp.c_proj.bias"))
        params["blocks"][i] = dict(attn=attn, mlp=mlp, attn_norm=_layer_norm(sd, p + "ln_1"),
                                   mlp_norm=_layer_norm(sd, p + "ln_2"))
    _head_from_hf(sd, s, params, "lm_head.weight")
    return params


def _layer_norm(sd, name):
    return dict(scale=sd.pop(name + ".weight"), bias=sd.pop(name + ".bias"))


def _gpt2_to_hf(params, s):
    sd = {"transformer.wte.weight": params["embed"], "transformer.wpe.weight": params["pos_embed"],
          "transformer.ln_f.weight": params["final_norm"]["scale"],
          "transformer.ln_f.bias": params["final_norm"]["bias"]}
    for i in range(s.n_layers):
        b, p = params["blocks"][i], f"transformer.h.{i}."
        a, m = b["attn"], b["mlp"]
        flat = lambda x: x.reshape(s.d_model, -1)  # noqa: E731
        sd[p + "attn.c_attn.weight"] = np.concatenate([flat(a["q"]), flat(a["k"]), flat(a["v"])], axis=1)
        sd[p + "attn.c_attn.bias"] = np.concatenate([a["q_bias"].ravel(), a["k_bias"].ravel(), a["v_bias"].ravel()])
        sd[p + "attn.c_proj.weight"] = a["o"].reshape(-1, s.d_model)
        sd[p + "attn.c_proj.bias"] = a["o_bias"]
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = m["up"], m["up_bias"]
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = m["down"], m["down_bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = b[ours]["scale"], b[ours]["bias"]
    if not s.tie_embeddings:
        sd["lm_head.weight"] = params["head"].T
    return sd


# ----------------------------------------------------------------------------------------------- LLaMA tensors


def _llama_from_hf(sd, s):
    d, hd = s.d_model, s.head_dim
    params = dict(embed=sd.pop("model.embed_tokens.weight"), final_norm=dict(scale=sd.pop("model.norm.weight")),
                  blocks={})
    for i in range(s.n_layers):
        p = f"model.layers.{i}."
        proj = lambda name, heads: sd.pop(p + f"self_attn.{name}_proj.weight").T.reshape(d, heads, hd)  # noqa: E731
        attn = dict(q=proj("q", s.n_heads), k=proj("k", s.n_kv_heads), v=proj("v", s.n_kv_heads),
                    o=sd.pop(p + "self_attn.o_proj.weight").T.reshape(s.n_heads, hd, d))
        mlp = {ours: sd.pop(p + f"mlp.{theirs}_proj.weight").T
               for ours, theirs in (("gate", "gate"), ("up", "up"), ("down", "down"))}
        params["blocks"][i] = dict(attn=attn, mlp=mlp,
                                   attn_norm=dict(scale=sd.pop(p + "input_layernorm.weight")),
                                   mlp_norm=dict(scale=sd.pop(p + "post_attention_layernorm.weight")))
    _head_from_hf(sd, s, params, "lm_head.weight")
    return params


def _llama_to_hf(params, s):
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]["scale"]}
    for i in range(s.n_layers):
        b, p = params["blocks"][i], f"model.layers.{i}."
        for name in ("q", "k", "v"):
            sd[p + f"self_attn.{name}_proj.weight"] = b["attn"][name].reshape(s.d_model, -1).T
        sd[p + "self_attn.o_proj.weight"] = b["attn"]["o"].reshape(-1, s.d_model).T
        for name in ("gate", "up", "down"):
            sd[p + f"mlp.{name}_proj.weight"] = b["mlp"][name].T
        sd[p + "input_layernorm.weight"] = b["attn_norm"]["scale"]
        sd[p + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
    if not s.tie_embeddings:
        sd["lm_head.weight"] = params["head"].T
    return sd


def _head_from_hf(sd, s, params, name):
    head = sd.pop(name, None)
    if not s.tie_embeddings:
        if head is None:
            raise HFError(f"untied model (tie_word_embeddings=False) but the checkpoint has no {name}")
        params["head"] = head.T


_FAMILIES = {"gpt2": (_gpt2_from_hf, _gpt2_to_hf), "llama": (_llama_from_hf, _llama_to_hf)}


# ----------------------------------------------------------------------------------------------- public API


def from_hf_state_dict(state_dict: dict, model_config) -> dict:
    """HF tensors (numpy, jax or torch) -> our params as a pure dict (`lm.model.from_params` builds the model)."""
    s = ModelSpec.from_config(model_config)
    sd = {_strip(name, s.family): _to_numpy(t) for name, t in state_dict.items()
          if not name.endswith(_IGNORED_SUFFIXES)}
    params = _FAMILIES[s.family][0](sd, s)
    if sd:
        raise HFError(f"unexpected tensors in the {s.family} checkpoint: {sorted(sd)[:8]}")
    return stack_layers(params) if s.scan_layers else params


def to_hf_state_dict(model: Transformer, model_config=None) -> dict:
    """Our model's params -> the HF state dict of numpy float32 arrays (tied heads are left out, as HF saves them)."""
    s = model.spec if model_config is None else ModelSpec.from_config(model_config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if s.scan_layers:
        params = unstack_layers(params, s.n_layers)
    params = _map_arrays(lambda x: np.asarray(x, np.float32), params)
    return {name: np.ascontiguousarray(t) for name, t in _FAMILIES[s.family][1](params, s).items()}


def load_hf(path_or_state_dict, family: str | None = None, hf_config=None, **overrides):
    """-> (model_config, Transformer) from an HF directory / .safetensors file, or a state dict + `hf_config`.

    hf_config: a dict or a transformers config object; read from config.json beside the weights when omitted.
    overrides: model config keys to set, e.g. dtype="bfloat16", scan_layers=True.
    """
    if isinstance(path_or_state_dict, dict):
        if hf_config is None:
            raise HFError("load_hf(state_dict, ...) needs hf_config (the HF config dict or object)")
        state_dict = path_or_state_dict
    else:
        state_dict, directory = _read_safetensors(pathlib.Path(path_or_state_dict))
        if hf_config is None:
            hf_config = _read_json(directory / "config.json")
    if not isinstance(hf_config, dict):
        hf_config = hf_config.to_dict()
    model_config = config_from_hf(hf_config, family, **overrides)
    model = from_params(model_config, from_hf_state_dict(state_dict, model_config))
    logging.info("loaded HF %s model: %s parameters", model_config.family, f"{param_count(model_config):,}")
    return model_config, model


def export_hf(model: Transformer, model_config, out_dir, **hf_config) -> pathlib.Path:
    """Writes config.json + model.safetensors into `out_dir` (extra HF config keys, e.g. eos_token_id, as kwargs)."""
    from safetensors.numpy import save_file
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**config_to_hf(model_config), **hf_config}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_hf_state_dict(model, model_config), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _read_safetensors(path: pathlib.Path):
    """All tensors of a .safetensors file, or of the (possibly sharded) safetensors files in a directory."""
    from safetensors.flax import load_file
    if path.is_file():
        files, directory = [path], path.parent
    elif path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted({path / f for f in _read_json(index)["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        directory = path
    else:
        raise HFError(f"{path}: no such file or directory")
    if not files:
        raise HFError(f"{path}: no .safetensors files (pytorch .bin checkpoints are not supported)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors, directory


def _read_json(path):
    if not path.exists():
        raise HFError(f"{path}: missing (pass hf_config= to load_hf)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _strip(name, family):
    if family == "gpt2":
        return name.removeprefix("transformer.")
    return name


def _to_numpy(t):
    if hasattr(t, "detach"):  # a torch tensor; go through float32 since numpy has no bfloat16
        return t.detach().cpu().float().numpy()
    return np.asarray(jnp.asarray(t, jnp.float32))


def _map_arrays(fn, tree):
    return {k: _map_arrays(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}

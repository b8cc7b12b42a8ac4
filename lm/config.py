"""Config-as-code: load `configs/<name>.py[:arg]`, apply `key=value` overrides, validate with clear errors.

Command lines use ml_collections' config flag (`--config=configs/tiny.py:llama --config.train.lr=3e-4`);
tests and `lm.main` use `load()`, which applies the same kind of overrides.
"""
import ast
import importlib.util
import pathlib

import ml_collections
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / "configs" / "tiny.py")


class ConfigError(ValueError):
    """A config value or override that is not allowed; the message names the key."""


def define_config_flag(default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
    """`--config=configs/x.py[:arg]` plus `--config.a.b=value` overrides, for a stage's absl main."""
    return config_flags.DEFINE_config_file("config", default, "Config file, e.g. configs/tiny.py:llama.",
                                           lock_config=True)


def load(spec: str = DEFAULT_CONFIG, overrides=()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, applies overrides given as "a.b=value" strings or a {"a.b": value} dict, validates."""
    path, _, arg = spec.partition(":")
    path = pathlib.Path(path)
    if not path.exists() and (REPO / path).exists():
        path = REPO / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"lm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        set_value(config, key, value)
    return validate(config)


def _split_override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip().removeprefix("config."), value.strip()


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets dotted `key`; a string value is parsed to the type of the current value. Unknown keys are errors."""
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in override {key}={value!r})")
        node = node[name]
    if leaf not in node:
        raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(node.keys())}")
    current = node[leaf]
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse(key, value, current)
    try:
        with node.unlocked():
            node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config.{key}={value!r}: {e}") from None


def _parse(key, text, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{key}={text!r}: expected a boolean")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"config.{key}={text!r}: expected {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"config.{key}={text!r}: expected {type(current).__name__}, got {type(value).__name__}")
    return value


# Each rule: (dotted key, predicate, what the value must be).
_RULES = (
    ("mesh.data", lambda v: v == -1 or v >= 1, "a positive int or -1 (the rest of the devices)"),
    ("mesh.fsdp", lambda v: v == -1 or v >= 1, "a positive int or -1"),
    ("mesh.tensor", lambda v: v == -1 or v >= 1, "a positive int or -1"),
    ("tokenizer.kind", lambda v: v in ("bpe", "sentencepiece", "pretrained"), "bpe, sentencepiece or pretrained"),
    ("dataset.packing", lambda v: v in ("concat", "document"), "concat or document"),
    ("model.family", lambda v: v in ("gpt2", "llama"), "'gpt2' or 'llama'"),
    ("model.n_layers", lambda v: v >= 1, "a positive int"),
    ("model.d_model", lambda v: v >= 1, "a positive int"),
    ("model.n_heads", lambda v: v >= 1, "a positive int"),
    ("model.dtype", lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    ("model.param_dtype", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    ("train.steps", lambda v: v >= 0, "a non-negative int"),
    ("train.batch_size", lambda v: v >= 1, "a positive int"),
    ("train.seq_len", lambda v: v >= 1, "a positive int"),
    ("train.lr", lambda v: v > 0, "> 0"),
    ("train.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("train.schedule", lambda v: v in ("cosine", "linear", "constant"), "cosine, linear or constant"),
    ("train.grad_accum", lambda v: v >= 1, "a positive int"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
)


def get(config, key, default=None):
    node = config
    for name in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            return default
        node = node[name]
    return node


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the known keys; the error names the key and the bad value."""
    for key, ok, expected in _RULES:
        value = get(config, key)
        if value is None:
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"config.{key}={value!r}: must be {expected}")
    model = get(config, "model")
    if model is not None:
        if model.d_model % model.n_heads:
            raise ConfigError(f"config.model.d_model={model.d_model} is not divisible by "
                              f"config.model.n_heads={model.n_heads}")
        kv = model.get("n_kv_heads") or model.n_heads
        if model.n_heads % kv:
            raise ConfigError(f"config.model.n_heads={model.n_heads} is not divisible by "
                              f"config.model.n_kv_heads={kv}")
    train = get(config, "train")
    if train is not None and train.batch_size % train.grad_accum:
        raise ConfigError(f"config.train.batch_size={train.batch_size} is not divisible by "
                          f"config.train.grad_accum={train.grad_accum}")
    return config

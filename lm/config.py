"""Config-as-code: load `configs/<name>.py[:arg]`, apply `key=value` overrides, validate with clear errors.

Command lines use ml_collections' config flag (`--config=configs/tiny.py:llama --config.train.lr=3e-4`);
tests and `lm.main` use `load()`, which applies the same kind of overrides. `configs/` is a package (presets do
`from configs import base`); a config file is loaded by path, so one outside the repository works too, and a
relative `configs/...` path that is not under the current directory is looked up in the repository.
"""
import ast
import difflib
import importlib.util
import pathlib
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / "configs" / "tiny.py")


class ConfigError(ValueError):
    """A config value or override that is not allowed; the message names the key."""


def define_config_flag(default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
    """`--config=configs/x.py[:arg]` plus `--config.a.b=value` overrides, for a stage's absl main.

    The command line is checked first (`check_command_line`): an unknown key or a value that `validate` rejects
    ends the program with a one-line error that names the key, before absl's flag parsing.
    """
    try:
        sys.argv[1:] = check_command_line(sys.argv[1:], default)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return config_flags.DEFINE_config_file("config", default, "Config file, e.g. configs/tiny.py:llama.",
                                           lock_config=True)


def check_command_line(args: list, default: str = DEFAULT_CONFIG) -> list:
    """Checks the --config and --config.a.b=value arguments of a command line; returns `args` with a config path
    that exists only under the repository (`configs/tiny.py` run from elsewhere) made absolute.

    Raises ConfigError for an unknown key (with the closest known one) or a value `validate` rejects. A value this
    module cannot parse is left to ml_collections' parser, which reports it.
    """
    args = list(args)
    spec, where = default, None
    for i, item in enumerate(args):
        if item.startswith("--config="):
            spec, where = item.split("=", 1)[1], i
        elif item == "--config" and i + 1 < len(args):
            spec, where = args[i + 1], i + 1
    path, colon, arg = spec.partition(":")
    resolved = resolve_path(path)
    if where is not None and str(resolved) != path:
        args[where] = ("--config=" if args[where].startswith("--config=") else "") + str(resolved) + colon + arg
    config = _get_config(resolved, arg)
    overrides, complete = [], True  # complete: every override's value is in `args` (not `--config.a.b VALUE`)
    for item in args:
        if not item.startswith(("--config.", "--noconfig.")):
            continue
        key, has_value, value = item.split(".", 1)[1].partition("=")
        check_key(config, key)
        if item.startswith("--noconfig."):
            overrides.append((key, "false"))
        elif has_value:
            overrides.append((key, value))
        else:
            complete = False
    try:
        for key, value in overrides:
            set_value(config, key, value)
    except ConfigError:
        return args  # a value for ml_collections' parser to judge (it names the flag)
    if complete:
        validate(config)
    return args


def resolve_path(path) -> pathlib.Path:
    """A config file's path: as given (relative to the current directory), else relative to the repository."""
    path = pathlib.Path(path)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    return path


def _get_config(path: pathlib.Path, arg: str) -> ml_collections.ConfigDict:
    module_spec = importlib.util.spec_from_file_location(f"lm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if e.name != "configs":
            raise
        raise ConfigError(f"{path}: `configs` is not importable; run from the repository root or reinstall "
                          f"(pip install -e .), which installs the configs package") from None
    return module.get_config(arg) if arg else module.get_config()


def load(spec: str = DEFAULT_CONFIG, overrides=()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, applies overrides given as "a.b=value" strings or a {"a.b": value} dict, validates."""
    path, _, arg = spec.partition(":")
    config = _get_config(resolve_path(path), arg)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        set_value(config, key, value)
    return validate(config)


def _split_override(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip().removeprefix("config."), value.strip()


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises ConfigError when dotted `key` is not in `config`, suggesting the closest key that is."""
    node = config
    for name in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            close = difflib.get_close_matches(key, list(_keys(config)), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key}{hint}")
        node = node[name]


def _keys(node, prefix=""):
    """Every dotted key of a config, sections and leaves."""
    for name, value in node.items():
        yield prefix + name
        if isinstance(value, ml_collections.ConfigDict):
            yield from _keys(value, f"{prefix}{name}.")


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets dotted `key`; a string value is parsed to the type of the current value. Unknown keys are errors."""
    check_key(config, key)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
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
    seq_len, max_len = get(config, "train.seq_len"), get(config, "model.max_len")
    if seq_len is not None and max_len is not None and seq_len > max_len:
        raise ConfigError(f"config.train.seq_len={seq_len} > config.model.max_len={max_len}: a training window "
                          f"must fit the model's positions")
    return config

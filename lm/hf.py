"""The program for lm.model.hf (HF transformers weights in and out); it sits above lm.checkpoint, since it reads and
writes runs.

    python -m lm.hf --from_hf=DIR                  load an HF checkpoint, print its config and a forward pass
    python -m lm.hf --from_hf=DIR --to_run=W       import it as an lm run (checkpoint + meta + tokenizer) into W
    python -m lm.hf --workdir=W --to_hf=DIR        export the latest checkpoint of a run in HF format

An imported run is what `lm.checkpoint.load_run(W)` and `--config.grpo.init_from=W` (or sft's) take. Its tokenizer
is converted from the HF directory's tokenizer.json (byte-level BPE: GPT-2, LLaMA 3, and our own exports), with our
reserved chat tokens appended when it lacks them; the embedding (and an untied head) then grow by those rows, each
the mean of the existing rows, so the logits of the original ids are HF's.
"""
import json
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from lm import checkpoint
from lm import config as lm_config
from lm.model import hf, param_count
from lm.tokenizer import encoding
from lm.tokenizer.base import byte_level_ranks, byte_to_unicode

FLAGS = flags.FLAGS
HF_TOKENIZER = "tokenizer.json"
VOCAB_TENSORS = ("wte.weight", "embed_tokens.weight", "lm_head.weight")   # HF names of the [vocab, d] tensors


def define_flags():
    flags.DEFINE_string("from_hf", None, "HF checkpoint directory (config.json + *.safetensors) to load.")
    flags.DEFINE_string("to_run", None, "With --from_hf: write the model as an lm run directory here.")
    flags.DEFINE_string("to_hf", None, "Directory to export the run's checkpoint to, in HF format.")
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint --to_hf exports.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")


# -- writing a run ----------------------------------------------------------------------------------------------------
def save_run(run, model, config, tokenizer, objective: str = "sft", step: int = 1, **meta) -> pathlib.Path:
    """`run` as a trainer leaves it: one checkpoint (params, the full config, the tokenizer's hash) and the
    tokenizer in run/tokenizer. Imports, tests and benchmarks make their starting runs with this."""
    run = pathlib.Path(run)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    checkpoints = checkpoint.Checkpoints(checkpoint.checkpoint_dir(run))
    checkpoints.save(step, {"params": params}, {"config": config.to_dict(), "tokenizer_hash": tokenizer.hash,
                                                "objective": objective, **meta})
    checkpoints.close()
    tokenizer.save(run / "tokenizer")
    return run


def import_run(hf_dir, run, base_config: str = lm_config.DEFAULT_CONFIG) -> pathlib.Path:
    """The HF checkpoint in `hf_dir` as an lm run in `run`: its model, with base_config's other settings, and its
    tokenizer.json converted (an error naming the file when it is missing or not byte-level BPE)."""
    hf_dir = pathlib.Path(hf_dir)
    tokenizer = tokenizer_from_hf(hf_dir / HF_TOKENIZER)
    state_dict, _ = hf._read_safetensors(hf_dir)
    hf_config = hf._read_json(hf_dir / "config.json")
    if tokenizer.n_vocab > hf_config["vocab_size"]:
        state_dict = grow_vocab(state_dict, hf_config["vocab_size"], tokenizer.n_vocab)
        hf_config = dict(hf_config, vocab_size=tokenizer.n_vocab)
    model_config, model = hf.load_hf(state_dict, hf_config=hf_config)
    config = lm_config.load(base_config)
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model_config.to_dict())
    return save_run(run, model, config, tokenizer, objective="hf_import", imported_from=str(hf_dir.resolve()))


def grow_vocab(state_dict: dict, vocab_size: int, new_size: int) -> dict:
    """The HF state dict with its [vocab, d] tensors grown to new_size rows, each new row the mean of the others."""
    def grow(name, tensor):
        if not name.endswith(VOCAB_TENSORS) or tensor.shape[0] != vocab_size:
            return tensor
        tensor = np.asarray(tensor, np.float32)
        return np.concatenate([tensor, np.repeat(tensor.mean(0, keepdims=True), new_size - vocab_size, 0)])
    return {name: grow(name, tensor) for name, tensor in state_dict.items()}


# -- HF tokenizer.json -> our tokenizer -------------------------------------------------------------------------------
def tokenizer_from_hf(path) -> encoding.TiktokenTokenizer:
    """A byte-level BPE tokenizer.json as our tokenizer with the same ids (plus our reserved chat tokens after the
    vocabulary when it lacks them). Its merge order must be its id order, as in GPT-2's and LLaMA 3's files, since
    tiktoken merges by rank."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no HF tokenizer.json here; lm.hf imports the tokenizer from it (a run "
                                f"needs its tokenizer), so put the model's tokenizer.json beside config.json")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    pattern = _split_pattern(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pattern is None:
        raise ValueError(f"{path}: a {model.get('type')} model with pre_tokenizer "
                         f"{(data.get('pre_tokenizer') or {}).get('type')}: only byte-level BPE converts")
    specials = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
    ranks = byte_level_ranks(model["vocab"], path, skip=specials)
    _check_merge_order(path, model, ranks, {c: b for b, c in byte_to_unicode().items()})
    return encoding.from_ranks(path.parent.name, ranks, pattern, specials)


def _split_pattern(pre_tokenizer) -> str | None:
    """The split regex of a byte-level pre-tokenizer: GPT-2's for ByteLevel(use_regex), a Split's own in a
    Sequence with ByteLevel (LLaMA 3); None for anything else."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    byte_level = [s for s in steps if s["type"] == "ByteLevel"]
    splits = [s["pattern"]["Regex"] for s in steps if s["type"] == "Split" and "Regex" in s.get("pattern", {})]
    if len(byte_level) != 1 or len(steps) != len(byte_level) + len(splits) or len(splits) > 1:
        return None
    if splits:
        return splits[0]
    return encoding.GPT2_PATTERN if byte_level[0].get("use_regex", True) else None


def _check_merge_order(path, model: dict, ranks: dict, unicode_to_byte: dict) -> None:
    last = 255
    for number, merge in enumerate(model.get("merges") or [], start=1):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank = ranks.get(bytes(unicode_to_byte[c] for c in left + right))
        if rank is None or rank < last:
            raise ValueError(f"{path}: merge {number} ({left!r} + {right!r}) is not in id order; tiktoken merges by "
                             f"rank, so this vocabulary does not convert")
        last = rank


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.from_hf and FLAGS.to_run:
        run = import_run(FLAGS.from_hf, FLAGS.to_run)
        model, tok, config, _ = checkpoint.load_run(run)
        print(f"imported {FLAGS.from_hf} as the run {run}: {config.model.family}, "
              f"{param_count(config.model):,} parameters, tokenizer {tok.name} ({tok.n_vocab} ids)")
    elif FLAGS.from_hf:
        model_config, model = hf.load_hf(FLAGS.from_hf)
        print(model_config)
        tokens = jnp.arange(8, dtype=jnp.int32)[None] % model_config.vocab_size
        logits = model(tokens)
        print(f"parameters: {param_count(model_config):,}; logits on tokens 0..7: shape {logits.shape}, "
              f"argmax {np.asarray(logits.argmax(-1))[0].tolist()}")
    elif FLAGS.to_hf:
        if not FLAGS.workdir:
            raise app.UsageError("--to_hf needs --workdir")
        model, tok, config, meta = checkpoint.load_run(FLAGS.workdir, step=FLAGS.step)
        out = hf.export_hf(model, config.model, FLAGS.to_hf, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
        print(f"exported step {meta.get('step')} of {FLAGS.workdir} to {out}")
    else:
        raise app.UsageError("pass --from_hf=DIR [--to_run=W], or --workdir=W --to_hf=DIR")


if __name__ == "__main__":
    define_flags()
    app.run(main)

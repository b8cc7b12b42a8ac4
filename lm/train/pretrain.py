"""The pretraining objective: next-token cross-entropy on <workdir>/tokens, through the one loop.

    python -m lm.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N]
"""
import pathlib

import ml_collections
from absl import logging
from flax import nnx

from lm import model as lm_model
from lm.train import loop, losses
from lm.train.losses import lm_loss  # noqa: F401 (the pretraining loss; benchmarks name it pretrain.lm_loss)


def resolve_vocab(config, n_vocab: int) -> ml_collections.ConfigDict:
    """A copy of `config` with model.vocab_size taken from the tokenizer when it is 0."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.model.vocab_size:
        config.model.vocab_size = int(n_vocab)
    elif config.model.vocab_size < n_vocab:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                         f"{n_vocab} tokens")
    return config


def _tokenizer_dir(workdir, tokens_dir) -> pathlib.Path | None:
    """The absolute tokenizer directory next to the tokens (<workdir>/tokenizer, or beside the real tokens_dir)."""
    for candidate in (pathlib.Path(workdir) / "tokenizer", pathlib.Path(tokens_dir).resolve().parent / "tokenizer"):
        if candidate.is_dir():
            return candidate.absolute()
    return None


def _has_val_window(tokens_dir, seq_len: int, packing: str) -> bool:
    """False, with a warning, when the val split cannot make one batch (no eval then, rather than a crash)."""
    from lm.data import tokenize

    val = tokenize.read_index(tokens_dir)["splits"].get("val") or {}
    tokens = int(val.get("tokens", 0))
    if tokens == 0 or (packing == "concat" and tokens < seq_len + 1):
        logging.warning("%s: the val split has %d tokens, too few for one window of %d: no validation loss",
                        tokens_dir, tokens, seq_len + 1)
        return False
    return True


def objective(config, tokens_dir, tokenizer_dir=None) -> loop.Objective:
    """The pretraining Objective over the token shards in `tokens_dir` (config.model.vocab_size resolved).

    config.train.loss_chunk > 0 computes the cross-entropy that many positions at a time (lm.train.losses).
    """
    from lm.data import pipeline, tokenize  # the pipeline brings tf.data; keep it off the import path

    train = config.train
    packing = config.dataset.get("packing", "concat") if "dataset" in config else "concat"
    tokenizer = tokenize.read_index(tokens_dir)["tokenizer"]

    def train_batches(start_step):
        return pipeline.train_batches(tokens_dir, train.seq_len, train.batch_size, config.seed,
                                      start_step=start_step, packing=packing)

    def eval_batches():
        return pipeline.val_batches(tokens_dir, train.seq_len, train.batch_size, packing=packing,
                                    max_batches=train.get("eval_batches") or None)

    return loop.Objective(
        loss=losses.make_lm_loss(train),
        train_batches=train_batches,
        eval_batches=eval_batches if _has_val_window(tokens_dir, train.seq_len, packing) else None,
        make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(config.seed)),
        flops_per_token=lm_model.flops_per_token(config.model, train.seq_len),
        meta=dict(objective="pretrain", tokenizer_hash=tokenizer.get("hash"), tokenizer_name=tokenizer.get("name"),
                  tokenizer_dir=str(tokenizer_dir) if tokenizer_dir else None,
                  data_seed=config.seed, tokens_dir=str(tokens_dir)),
    )


def run(config, workdir, stop_after: int | None = None) -> dict:
    """Pretrains on <workdir>/tokens to config.train.steps total steps, resuming from the latest checkpoint.

    Returns the loop's summary (steps, train_loss, val_loss, tokens_per_sec, mfu, params, ...).
    """
    from lm.data import tokenize

    tokens_dir = pathlib.Path(workdir) / "tokens"
    config = resolve_vocab(config, tokenize.read_index(tokens_dir)["tokenizer"]["n_vocab"])
    tokenizer_dir = _tokenizer_dir(workdir, tokens_dir)
    summary = loop.train(config, workdir, objective(config, tokens_dir, tokenizer_dir), stop_after=stop_after)
    return dict(summary, metrics=str(pathlib.Path(workdir) / "metrics.jsonl"))

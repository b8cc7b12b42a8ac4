"""The pretraining objective: next-token cross-entropy on <workdir>/tokens, through the one loop.

    python -m lm.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N]
"""
import pathlib

import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lm import model as lm_model
from lm.train import loop


def lm_loss(model, batch):
    """(summed token cross-entropy over loss_mask, number of scored tokens, {}) for a batch of inputs/targets."""
    logits = model(batch["inputs"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask), {}


def resolve_vocab(config, n_vocab: int) -> ml_collections.ConfigDict:
    """A copy of `config` with model.vocab_size taken from the tokenizer when it is 0."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.model.vocab_size:
        config.model.vocab_size = int(n_vocab)
    elif config.model.vocab_size < n_vocab:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                         f"{n_vocab} tokens")
    return config


def objective(config, tokens_dir) -> loop.Objective:
    """The pretraining Objective over the token shards in `tokens_dir` (config.model.vocab_size resolved)."""
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
        loss=lm_loss,
        train_batches=train_batches,
        eval_batches=eval_batches,
        make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(config.seed)),
        flops_per_token=lm_model.flops_per_token(config.model, train.seq_len),
        meta=dict(objective="pretrain", tokenizer_hash=tokenizer.get("hash"), tokenizer_name=tokenizer.get("name"),
                  data_seed=config.seed, tokens_dir=str(tokens_dir)),
    )


def run(config, workdir, stop_after: int | None = None) -> dict:
    """Pretrains on <workdir>/tokens to config.train.steps total steps, resuming from the latest checkpoint.

    Returns the loop's summary (steps, train_loss, val_loss, tokens_per_sec, mfu, params, ...).
    """
    from lm.data import tokenize

    tokens_dir = pathlib.Path(workdir) / "tokens"
    config = resolve_vocab(config, tokenize.read_index(tokens_dir)["tokenizer"]["n_vocab"])
    summary = loop.train(config, workdir, objective(config, tokens_dir), stop_after=stop_after)
    return dict(summary, metrics=str(pathlib.Path(workdir) / "metrics.jsonl"))

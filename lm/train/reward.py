"""The reward model: a TransformerWithScalarHead started from the SFT checkpoint (trunk loaded, `scalar_head` fresh),
trained with the Bradley-Terry loss on preference pairs; writes <workdir>/reward/.

    python -m lm.train --config=configs/reward_tiny.py --workdir=W      # W/sft/ -> W/reward/

Data (`config.reward.data`): "synthetic" (pairs over the arithmetic task's prompts where the well-formed, correct
answer is chosen: `synthetic_pairs`; no files needed, so the bundled pipeline runs anywhere) or paths / globs of
preference files (HH-RLHF and the other formats of lm.data.preferences; bad lines are counted with file:line in the
report). The pairs are split by a seeded hash of the prompt into train / held-out (`held_out_fraction`).

Rows are right-padded (lm.data.preferences.tokenize_pairs); a pair's score is read at each side's last real token,
<|assistant_end|>, found from its length (`model.scores(tokens, lengths)`): never "the last column". Chosen and
rejected go through the model as one batch of 2B rows, cut to `bucket_width` of the batch's longest row (dynamic
padding with few compiled widths: preference pairs are mostly far shorter than seq_len). Loss:
rl_math.bradley_terry_loss with `margin` and `center_coef`; metrics pairwise accuracy and reward margin, on the
training batches and (as val_*) on the held-out pairs at every eval.

Normalisation for RL: every checkpoint's meta holds "reward_normalization": {"mean", "std"} of that checkpoint's
scores over both sides of the training pairs (computed at save time through the Objective's checkpoint_meta), also
copied into <workdir>/reward/reward_report.json. `load_reward_model` returns them with the model; RL divides by
them so a reward of 1 is one std of the reward model's own scale.

The helpers `source_run`, `setup_from_source`, `preference_data` and `pair_batch` are shared by DPO and PPO.
"""
import json
import pathlib
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import model as lm_model
from lm import tokenizer as lm_tokenizer
from lm.data import pipeline, preferences
from lm.eval import tasks
from lm.train import loop, rl_math
from lm.train.pretrain import resolve_vocab

RUN_DIR = "reward"
REPORT = "reward_report.json"
NORMALIZATION = "reward_normalization"  # checkpoint meta key: {"mean", "std"} of the scores on the training pairs
SYNTHETIC_KINDS = ("repeated", "rambling", "wrong")
FILLER = ("let me think about the weather", "numbers are fun and so is tea", "I like long walks and lists",
          "by the way the sky is blue", "also here is a story about a cat")


# --- where a post-training run starts ------------------------------------------------------------------------------

def source_run(workdir, name: str):
    """The run a post-training stage starts from: `name` relative to the pipeline workdir (e.g. "sft"), an absolute
    path, or "" / "none" for none (a random init: tests and tools)."""
    if not name or name == "none":
        return None
    path = pathlib.Path(name)
    return path if path.is_absolute() else pathlib.Path(workdir) / path


def setup_from_source(config, workdir, run):
    """(config with the source's model section, tokenizer, source meta or {}) for a stage starting from `run`.

    The model shape is the source checkpoint's (its config.model), so its parameters load; the tokenizer is the one
    the source trained with (hash checked). With no source: <workdir>/tokenizer and config.model (vocab resolved).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    if run is None:
        tokenizer = lm_tokenizer.load(pathlib.Path(workdir) / "tokenizer")
        return resolve_vocab(config, tokenizer.n_vocab), tokenizer, {}
    checkpoints = lm_checkpoint.Checkpoints(lm_checkpoint.find_checkpoints(run), keep=None, read_only=True)
    try:
        meta = checkpoints.meta(checkpoints.latest_step())
    finally:
        checkpoints.close()
    tokenizer = lm_tokenizer.load(lm_checkpoint.find_tokenizer_dir(run, meta))
    if meta.get("tokenizer_hash") and tokenizer.hash != meta["tokenizer_hash"]:
        raise ValueError(f"{run}: tokenizer hash {tokenizer.hash} differs from the checkpoint's "
                         f"{meta['tokenizer_hash']}")
    config.model = ml_collections.ConfigDict(meta["config"]["model"])
    if config.train.seq_len > config.model.max_len:
        raise ValueError(f"config.train.seq_len={config.train.seq_len} > the source model's max_len="
                         f"{config.model.max_len} ({run})")
    return config, tokenizer, meta


def tokenizer_meta(tokenizer, run, meta) -> dict:
    tokenizer_dir = lm_checkpoint.find_tokenizer_dir(run, meta) if run is not None else None
    return dict(tokenizer_hash=tokenizer.hash, tokenizer_dir=str(pathlib.Path(tokenizer_dir).absolute())
                if tokenizer_dir else None)


# --- preference data -----------------------------------------------------------------------------------------------

def synthetic_pairs(n: int, seed: int = 0, kinds=SYNTHETIC_KINDS, split: str = "train") -> list:
    """`n` pairs over arithmetic prompts: chosen is the correct short answer; rejected (kind picked in turn) is the
    same answer repeated ("repeated"), the answer drowned in unrelated filler ("rambling"), or a wrong number
    ("wrong": only a model that can add tells these apart)."""
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(SYNTHETIC_KINDS):
        raise ValueError(f"synthetic kinds {kinds}: choose from {SYNTHETIC_KINDS}")
    rng = random.Random(f"synthetic-preferences:{seed}")
    examples = tasks.Arithmetic().examples(split, n=n, seed=seed)
    pairs = []
    for i, example in enumerate(examples):
        kind, answer = kinds[i % len(kinds)], example.reference
        chosen = f"The answer is {answer}."
        if kind == "repeated":
            rejected = " ".join([answer] * rng.randint(3, 8))
        elif kind == "rambling":
            rejected = f"{rng.choice(FILLER)}, and {answer} maybe."
        else:
            rejected = f"The answer is {int(answer) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])}."
        pairs.append(preferences.PreferencePair(example.prompt, chosen, rejected, f"synthetic:{kind}", i + 1))
    return pairs


def preference_data(reward_config, tokenizer, seq_len: int, seed: int) -> tuple[dict, dict, dict]:
    """(train rows, held-out rows, report) from `reward_config.data` (see the module doc), rows as
    lm.data.preferences.tokenize_pairs makes them (seq_len ids wide: a pair that does not fit is dropped, counted)."""
    data = reward_config.get("data", "synthetic")
    if data == "synthetic":
        pairs = synthetic_pairs(int(reward_config.get("synthetic_pairs", 512)), seed,
                                tuple(reward_config.get("synthetic_kinds", SYNTHETIC_KINDS)))
        read = dict(source="synthetic", kept=len(pairs), rejected=0)
    else:
        pairs, stats = preferences.load_pairs([data] if isinstance(data, str) else list(data))
        read = stats.to_dict()
        logging.info("preference data %s: %s", data, stats.summary())
        if not pairs:
            raise ValueError(f"config.reward.data={data!r}: no valid preference pairs ({stats.summary()})")
    limit = int(reward_config.get("max_pairs", 0) or 0)
    if limit:
        pairs = pairs[:limit]
    train, held_out = preferences.split_pairs(pairs, float(reward_config.get("held_out_fraction", 0.1)), seed)
    train_rows = preferences.tokenize_pairs(tokenizer, train, seq_len - 1)
    held_rows = preferences.tokenize_pairs(tokenizer, held_out, seq_len - 1)
    report = dict(read=read, train=train_rows["stats"], held_out=held_rows["stats"])
    if not len(train_rows["chosen_ids"]):
        raise ValueError(f"config.reward.data={data!r}: no training pair fits train.seq_len={seq_len} ({report})")
    return train_rows, held_rows, report


def pair_batch(rows: dict, step: int, batch_size: int, seed: int, bucket: bool = False) -> dict:
    """This process's pairs of step `step` (a seeded permutation per epoch: a pure function of step):
    {"chosen", "rejected": int32 [B, W], "chosen_lengths", "rejected_lengths": int32 [B], "chosen_mask",
    "rejected_mask": float32 [B, W - 1] (answer targets), and any other per-pair arrays of `rows`}.

    W is the rows' full width (seq_len), or with `bucket` the `bucket_width` of the global batch's longest row
    (the same on every process, since it is read from the whole batch's pairs).
    """
    n = len(rows["chosen_ids"])
    local = pipeline.local_rows(batch_size, jax.process_index(), jax.process_count())
    batch = rows_at(rows, pipeline.train_window_ids(step, n, batch_size, seed, local))
    if not bucket:
        return batch
    every = pipeline.train_window_ids(step, n, batch_size, seed, np.arange(batch_size))
    return cut_pairs(batch, bucket_width(longest(rows, every), rows["chosen_ids"].shape[1]))


def rows_at(rows: dict, picked) -> dict:
    out = {}
    for side in ("chosen", "rejected"):
        out[side] = rows[f"{side}_ids"][picked]
        out[f"{side}_lengths"] = rows[f"{side}_lengths"][picked]
        out[f"{side}_mask"] = rows[f"{side}_mask"][picked]
    for name, value in rows.items():  # extras, e.g. DPO's reference log-probs
        if name.startswith("ref_"):
            out[name] = value[picked]
    return out


def bucket_width(length: int, limit: int, per_octave: int = 4, smallest: int = 8) -> int:
    """The padded width of a batch whose longest row has `length` tokens: the next of `per_octave` evenly spaced
    widths between consecutive powers of two (..., 32, 40, 48, 56, 64, 80, 96, ...), at least `smallest`, at
    most `limit`. A batch is padded to its own longest row, as a dynamic-padding collator does, yet the train step
    compiles for only a few widths (at most `per_octave` per doubling) and wastes at most 1/per_octave of its rows."""
    length = max(int(length), smallest)
    step = max((1 << (length - 1).bit_length()) // (2 * per_octave), 1)  # the octave (2^k / 2, 2^k] in per_octave
    return min(-(-length // step) * step, int(limit))


def longest(rows: dict, picked) -> int:
    """The longest side (real tokens) of the pairs `picked`."""
    return int(max(rows["chosen_lengths"][picked].max(), rows["rejected_lengths"][picked].max()))


def cut_pairs(batch: dict, width: int) -> dict:
    """A pair batch (right-padded rows) cut to `width` columns: the same scores, since a row's real tokens never
    attend to the padding after them."""
    out = dict(batch)
    for side in ("chosen", "rejected"):
        out[side] = batch[side][:, :width]
        out[f"{side}_mask"] = batch[f"{side}_mask"][:, :width - 1]
    return out


def eval_pair_batches(rows: dict, batch_size: int, bucket: bool = False):
    """The held-out pairs in order, in full batches (a last partial batch is left out: shapes stay fixed); with
    `bucket`, each cut to the bucket_width of its longest row."""
    n = len(rows["chosen_ids"]) // batch_size * batch_size
    batches = []
    for i in range(0, n, batch_size):
        picked = np.arange(i, i + batch_size)
        batch = rows_at(rows, picked)
        batches.append(cut_pairs(batch, bucket_width(longest(rows, picked), rows["chosen_ids"].shape[1]))
                       if bucket else batch)
    return batches


# --- the objective -------------------------------------------------------------------------------------------------

def pair_scores(model, batch):
    """(chosen scores [B], rejected scores [B]) in one forward pass of 2B right-padded rows."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]])
    scores = model.scores(tokens, lengths)
    n = batch["chosen"].shape[0]
    return scores[:n], scores[n:]


def make_loss(margin: float = 0.0, center_coef: float = 0.0):
    """The reward model's loss as sums over the pairs of the batch (weight: the number of pairs)."""
    def loss(model, batch):
        chosen, rejected = pair_scores(model, batch)
        value, metrics = rl_math.bradley_terry_loss(chosen, rejected, margin, center_coef)
        n = jnp.float32(chosen.shape[0])
        return value * n, n, {name: v * n for name, v in metrics.items()}
    return loss


def objective(config, train_rows, held_rows, init_from=None, meta=None) -> loop.Objective:
    train, reward = config.train, config.reward

    def train_batches(start_step):
        for step in range(start_step, 10 ** 9):
            yield pair_batch(train_rows, step, train.batch_size, config.seed, bucket=True)

    held = eval_pair_batches(held_rows, train.batch_size, bucket=True)
    if not held:
        logging.warning("fewer held-out pairs (%d) than one batch (%d): no held-out accuracy",
                        len(held_rows["chosen_ids"]), train.batch_size)
    return loop.Objective(
        loss=make_loss(float(reward.get("margin", 0.0)), float(reward.get("center_coef", 0.0))),
        train_batches=train_batches,
        eval_batches=(lambda: held) if held else None,
        make_model=lambda: lm_model.TransformerWithScalarHead(config.model, rngs=nnx.Rngs(config.seed)),
        flops_per_token=lm_model.flops_per_token(config.model, train.seq_len),
        meta=dict(objective="reward", data_seed=config.seed, **(meta or {})),
        checkpoint_meta=lambda model: {NORMALIZATION: score_stats(model, train_rows, train.batch_size)},
        init_from=init_from, init_fresh=("scalar_head",))


@nnx.jit
def _scores(model, tokens, lengths):
    return model.scores(tokens, lengths)


def score_rows(model, tokens, lengths, batch_size: int) -> np.ndarray:
    """Scores of right-padded rows, `batch_size` rows at a time (the last batch padded with copies, cut after),
    each batch cut to the bucket_width of its longest row."""
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk_lengths = lengths[start:start + batch_size]
        chunk = tokens[start:start + batch_size, :bucket_width(chunk_lengths.max(), tokens.shape[1])]
        pad = batch_size - len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        chunk_lengths = np.concatenate([chunk_lengths, np.repeat(chunk_lengths[-1:], pad)]) if pad else chunk_lengths
        out.append(np.asarray(_scores(model, jnp.asarray(chunk), jnp.asarray(chunk_lengths)))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def pair_score_arrays(model, rows, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(score_rows(model, rows[f"{side}_ids"], rows[f"{side}_lengths"], batch_size)
                 for side in ("chosen", "rejected"))


def score_stats(model, rows, batch_size: int) -> dict:
    """Mean and std of the model's scores over both sides of `rows` (the RL normalisation)."""
    scores = np.concatenate(pair_score_arrays(model, rows, batch_size))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores))}


def pair_metrics(model, rows, batch_size: int) -> dict:
    """Held-out numbers of a scorer: pairwise accuracy (ties count 1/2), mean margin, pairs."""
    chosen, rejected = pair_score_arrays(model, rows, batch_size)
    if not len(chosen):
        return dict(pairs=0)
    accuracy = float(rl_math.pairwise_accuracy(jnp.asarray(chosen), jnp.asarray(rejected)))
    return dict(pairs=int(len(chosen)), accuracy=accuracy, margin=float(np.mean(chosen - rejected)))


# --- the run -------------------------------------------------------------------------------------------------------

def train_reward_model(config, run_dir, source, tokenizer, train_rows, held_rows, source_meta=None,
                       extra_report=None, stop_after=None) -> dict:
    """Trains (or resumes) a reward model in `run_dir` on the given rows; writes <run_dir>/reward_report.json with
    held-out and training accuracy and margin of the final model and the normalisation stats."""
    run_dir = pathlib.Path(run_dir)
    meta = tokenizer_meta(tokenizer, source, source_meta or {})
    obj = objective(config, train_rows, held_rows, init_from=source, meta=meta)
    batch = int(config.train.batch_size)
    summary = loop.train(config, run_dir, obj, stop_after=stop_after)
    if stop_after is not None and summary["steps"] < config.train.steps:
        return summary
    model, _, meta = lm_checkpoint.load_model(run_dir)
    stats = meta[NORMALIZATION]
    # Before training every score is 0 (the head starts at zero): held-out accuracy 0.5, margin 0, by construction.
    report = dict(summary, held_out_before=dict(accuracy=0.5, margin=0.0),
                  held_out=pair_metrics(model, held_rows, batch),
                  train=pair_metrics(model, train_rows, batch), normalization=stats, **(extra_report or {}))
    (run_dir / REPORT).write_text(json.dumps(report, indent=2, default=str))
    logging.info("reward model %s: held-out accuracy %s", run_dir, report["held_out"].get("accuracy"))
    return report


def load_reward_model(run, mesh=None):
    """(reward model, tokenizer, meta, {"mean", "std"}) of a reward run (its normalisation from the checkpoint meta)."""
    model, tokenizer, _, meta = lm_checkpoint.load_run(run, mesh=mesh)
    if NORMALIZATION not in meta:
        raise ValueError(f"{run}: checkpoint step {meta.get('step')} has no {NORMALIZATION!r} in its meta (not a "
                         f"reward-model run, or one saved before the normalisation moved there: retrain it)")
    return model, tokenizer, meta, meta[NORMALIZATION]


def run(config, workdir, stop_after: int | None = None) -> dict:
    """Reward model from config.reward.init_from (default W/sft) on config.reward.data -> W/reward/."""
    source = source_run(workdir, config.reward.get("init_from", "sft"))
    config, tokenizer, source_meta = setup_from_source(config, workdir, source)
    train_rows, held_rows, data_report = preference_data(config.reward, tokenizer, config.train.seq_len, config.seed)
    run_dir = pathlib.Path(workdir) / config.reward.get("run_dir", RUN_DIR)
    return train_reward_model(config, run_dir, source, tokenizer, train_rows, held_rows, source_meta,
                              extra_report=dict(data=data_report), stop_after=stop_after)

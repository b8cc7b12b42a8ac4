"""The reward model: a TransformerWithScalarHead started from the SFT checkpoint (trunk loaded, `scalar_head` fresh),
trained with the Bradley-Terry loss on preference pairs; writes <workdir>/reward/.

    python -m lm.train --config=configs/reward_tiny.py --workdir=W      # W/sft/ -> W/reward/

Data (`config.reward.data`): "synthetic" (pairs over the arithmetic task's prompts where the well-formed, correct
answer is chosen: `synthetic_pairs`; no files needed, so the bundled pipeline runs anywhere) or paths / globs of
preference files (HH-RLHF and the other formats of lm.data.preferences; bad lines are counted with file:line in the
report). The pairs are split by a seeded hash of the prompt into train / held-out (`held_out_fraction`).

Rows are right-padded (lm.data.preferences.tokenize_pairs); a pair's score is read at each side's last real token,
<|assistant_end|>, found from its length (`model.scores(tokens, lengths)`): never "the last column". Chosen and
rejected go through the model in one pass, in one row a pair: the prompt they share once, then each answer, blind
to the other (`pack_pairs`, `pair_mask`: the scores are those of two separate rows), or, when such a row would
not fit in max_len, in 2B plain rows. Rows are cut to `bucket_width` of the batch's longest row (dynamic padding
with few compiled widths: preference pairs are mostly far shorter than seq_len). Loss:
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


def pair_batch(rows: dict, step: int, batch_size: int, seed: int) -> dict:
    """This process's pairs of step `step` (a seeded permutation per epoch: a pure function of step):
    {"chosen", "rejected": int32 [B, seq_len], "chosen_lengths", "rejected_lengths": int32 [B], "chosen_mask",
    "rejected_mask": float32 [B, seq_len - 1] (answer targets), and any other per-pair arrays of `rows`}."""
    local = pipeline.local_rows(batch_size, jax.process_index(), jax.process_count())
    picked = pipeline.train_window_ids(step, len(rows["chosen_ids"]), batch_size, seed, local)
    return rows_at(rows, picked)


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


def eval_pair_batches(rows: dict, batch_size: int):
    """The held-out pairs in order, in full batches (a last partial batch is left out: shapes stay fixed)."""
    n = len(rows["chosen_ids"]) // batch_size * batch_size
    return [rows_at(rows, np.arange(i, i + batch_size)) for i in range(0, n, batch_size)]


# --- the reward model's rows: one a pair, the prompt shared ----------------------------------------------------------

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # segments of a shared row (padding: position -1)


def bucket_width(length: int, limit: int, per_octave: int = 4, smallest: int = 8) -> int:
    """The padded width of a batch whose longest row has `length` tokens: the next of `per_octave` evenly spaced
    widths between consecutive powers of two (..., 32, 40, 48, 56, 64, 80, 96, ...), at least `smallest`, at
    most `limit`. Each batch is padded to about its own longest row, as a dynamic-padding collator does, yet the
    step compiles for few widths (at most `per_octave` per doubling) and pads at most 1/per_octave more."""
    length = max(int(length), smallest)
    step = max((1 << (length - 1).bit_length()) // (2 * per_octave), 1)
    return min(-(-length // step) * step, int(limit))


def shared_prefix(batch: dict) -> np.ndarray:
    """Tokens both sides of each pair share from the start (the prompt), at most the shorter side's length - 1, so
    each side keeps its last token, where its score is read."""
    same = np.cumprod(batch["chosen"] == batch["rejected"], axis=1).sum(axis=1)
    return np.minimum(same, np.minimum(batch["chosen_lengths"], batch["rejected_lengths"]) - 1)


def pair_layout(batch: dict, max_len: int) -> tuple[bool, int]:
    """(shared, width) for the pairs of `batch` (the whole global batch, so every process lays out its rows
    alike): one row a pair if the longest such row fits in max_len (GPT-2's learned positions bound a row's
    width), else two right-padded rows a pair; width the bucket_width of the longest row."""
    shared = batch["chosen_lengths"] + batch["rejected_lengths"] - shared_prefix(batch)
    width = bucket_width(shared.max(), 2 * batch["chosen"].shape[1])
    if width <= max_len:
        return True, width
    longest = max(batch["chosen_lengths"].max(), batch["rejected_lengths"].max())
    return False, bucket_width(longest, batch["chosen"].shape[1])


def pack_pairs(batch: dict, shared: bool, width: int) -> dict:
    """A pair batch (`pair_batch`) -> the reward model's rows, `width` wide:
    {"tokens", "positions" (-1: padding), "segments": int32 [R, width], "chosen_row", "chosen_index",
    "rejected_row", "rejected_index": int32 [B] (where each side's last token is)}.

    shared: R = B, row i = pair i's shared prompt (PROMPT), chosen's rest (CHOSEN), then rejected's rest
    (REJECTED) at the positions it has in its own row; with `pair_mask` every token attends to exactly the tokens
    it attends to in its own side's row, so the scores are the two-row scores while the prompt runs once.
    Else R = 2B: the chosen rows, then the rejected rows, each plain causal (all PROMPT).
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    c, r = batch["chosen_lengths"].astype(np.int32), batch["rejected_lengths"].astype(np.int32)
    n = len(c)
    if not shared:
        tokens = np.concatenate([chosen, rejected])[:, :width]
        lengths = np.concatenate([c, r])
        steps = np.arange(width, dtype=np.int32)
        positions = np.where(steps < lengths[:, None], steps, -1).astype(np.int32)
        return dict(tokens=tokens, positions=positions, segments=np.zeros_like(tokens),
                    chosen_row=np.arange(n, dtype=np.int32), chosen_index=c - 1,
                    rejected_row=np.arange(n, 2 * n, dtype=np.int32), rejected_index=r - 1)
    prefix = shared_prefix(batch).astype(np.int32)
    tokens = np.zeros((n, width), np.int32)
    positions = np.full((n, width), -1, np.int32)
    segments = np.full((n, width), PROMPT, np.int32)
    for i, (p, nc, nr) in enumerate(zip(prefix, c, r)):
        end = nc + nr - p
        tokens[i, :nc], tokens[i, nc:end] = chosen[i, :nc], rejected[i, p:nr]
        positions[i, :nc], positions[i, nc:end] = np.arange(nc), np.arange(p, nr)
        segments[i, p:nc], segments[i, nc:end] = CHOSEN, REJECTED
    rows = np.arange(n, dtype=np.int32)
    return dict(tokens=tokens, positions=positions, segments=segments, chosen_row=rows, chosen_index=c - 1,
                rejected_row=rows, rejected_index=c + r - prefix - 1)


def pair_mask(segments):
    """bool [R, T, T]: a token may attend to the prompt and to its own segment (Transformer.hidden adds the causal
    mask and hides the padding)."""
    query, key = segments[:, :, None], segments[:, None, :]
    return (key == PROMPT) | (key == query)


def model_batches(batches, max_len: int):
    """`pack_pairs` of each pair batch, laid out by its own pairs (for batches every process holds whole)."""
    return [pack_pairs(b, *pair_layout(b, max_len)) for b in batches]


# --- the objective -------------------------------------------------------------------------------------------------

def pair_scores(model, batch):
    """(chosen scores [B], rejected scores [B]) of a `pack_pairs` batch, in one forward pass whose last block runs
    only at the read positions (Transformer.hidden_at): both ends of a shared row, or each plain
    row's end (pack_pairs puts pair i's chosen in row i, its rejected in row i or B + i)."""
    n = batch["chosen_row"].shape[0]
    shared = batch["tokens"].shape[0] == n
    if shared:
        index = jnp.stack([batch["chosen_index"], batch["rejected_index"]], axis=1)
    else:
        index = jnp.concatenate([batch["chosen_index"], batch["rejected_index"]])[:, None]
    hidden = model.hidden_at(batch["tokens"], index, batch["positions"], pair_mask(batch["segments"]))
    values = model.scalar_head(hidden)
    return (values[:, 0], values[:, 1]) if shared else (values[:n, 0], values[n:, 0])


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

    max_len = lm_model.ModelSpec.from_config(config.model).max_len
    everyone = np.arange(train.batch_size)

    def train_batches(start_step):
        for step in range(start_step, 10 ** 9):
            picked = pipeline.train_window_ids(step, len(train_rows["chosen_ids"]), train.batch_size, config.seed,
                                               everyone)  # the global batch: its layout is every process's
            yield pack_pairs(pair_batch(train_rows, step, train.batch_size, config.seed),
                             *pair_layout(rows_at(train_rows, picked), max_len))

    held = model_batches(eval_pair_batches(held_rows, train.batch_size), max_len)
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

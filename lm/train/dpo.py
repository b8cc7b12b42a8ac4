"""DPO (Rafailov et al. 2023): the SFT policy trained directly on preference pairs against itself frozen as the
reference; writes <workdir>/dpo/.

    python -m lm.train --config=configs/dpo_tiny.py --workdir=W        # W/sft/ -> W/dpo/

The pairs are the reward model's (`config.dpo.data` read by lm.train.reward.preference_data: synthetic or
preference files, split into train / held-out by prompt). A side's sequence log-prob is the sum of the token
log-probs of its answer (the targets the chat template supervises: the answer and <|assistant_end|>). The reference
log-probs of every pair are computed once, before training, from the frozen SFT parameters, and travel with the
batches (ref_chosen, ref_rejected). Loss: rl_math.dpo_loss with `beta` and `label_smoothing`; metrics the implicit
reward's accuracy and margin, on the training batches and (val_*) on the held-out pairs. At step 0 the policy is the
reference, so every implicit reward is 0: accuracy 0.5 and margin 0 by construction.
"""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import model as lm_model
from lm.config import ConfigError
from lm.train import loop, reward, rl_math
from lm.train.losses import sequence_token_logprobs

RUN_DIR = "dpo"


def sequence_logprobs(model, tokens, mask):
    """Summed log-probs of the answer targets: tokens int [B, T] (targets tokens[:, 1:]), mask [B, T - 1] -> [B]."""
    logprobs = sequence_token_logprobs(model, tokens[:, :-1], tokens[:, 1:])
    return rl_math.masked_sum(logprobs, mask, axis=1)


def pair_logprobs(model, batch):
    """(chosen [B], rejected [B]) sequence log-probs in one forward pass of 2B rows."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    out = sequence_logprobs(model, tokens, mask)
    n = batch["chosen"].shape[0]
    return out[:n], out[n:]


def make_loss(beta: float, label_smoothing: float = 0.0):
    def loss(model, batch):
        chosen, rejected = pair_logprobs(model, batch)
        value, metrics = rl_math.dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta,
                                          label_smoothing)
        n = jnp.float32(chosen.shape[0])
        return value * n, n, {name: v * n for name, v in metrics.items()}
    return loss


@nnx.jit
def _pair_logprobs(model, batch):
    return pair_logprobs(model, batch)


def with_reference(model, rows: dict, batch_size: int) -> dict:
    """`rows` plus ref_chosen / ref_rejected [n]: the frozen model's sequence log-probs of both sides."""
    n = len(rows["chosen_ids"])
    chosen, rejected = [], []
    for start in range(0, n, batch_size):
        picked = np.arange(start, start + batch_size) % max(n, 1)  # the last batch wraps: fixed shapes
        c, r = _pair_logprobs(model, reward.rows_at(rows, picked))
        keep = min(batch_size, n - start)
        chosen.append(np.asarray(c)[:keep])
        rejected.append(np.asarray(r)[:keep])
    empty = np.zeros((0,), np.float32)
    return dict(rows, ref_chosen=np.concatenate(chosen) if chosen else empty,
                ref_rejected=np.concatenate(rejected) if rejected else empty)


def objective(config, train_rows, held_rows, policy_run, meta) -> loop.Objective:
    train, dpo = config.train, config.dpo

    def train_batches(start_step):
        for step in range(start_step, 10 ** 9):
            yield reward.pair_batch(train_rows, step, train.batch_size, config.seed)

    held = reward.eval_pair_batches(held_rows, train.batch_size)
    return loop.Objective(
        loss=make_loss(float(dpo.beta), float(dpo.get("label_smoothing", 0.0))),
        train_batches=train_batches, eval_batches=(lambda: held) if held else None,
        make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(config.seed)),
        flops_per_token=lm_model.flops_per_token(config.model, train.seq_len),
        meta=dict(objective="dpo", data_seed=config.seed, beta=float(dpo.beta), **meta), init_from=policy_run)


def run(config, workdir, stop_after: int | None = None) -> dict:
    """DPO from config.dpo.policy (default W/sft, also the frozen reference) on config.dpo.data -> W/dpo/; writes
    W/dpo/dpo_report.json (held-out implicit-reward accuracy and margin at the end; 0.5 and 0 at the start)."""
    policy_run = reward.source_run(workdir, config.dpo.get("policy", "sft"))
    if policy_run is None:
        raise ConfigError("config.dpo.policy must name a run: DPO needs the SFT model as its reference")
    config, tokenizer, source_meta = reward.setup_from_source(config, workdir, policy_run)
    train_rows, held_rows, data_report = reward.preference_data(config.dpo, tokenizer, config.train.seq_len,
                                                                config.seed)
    reference, _, _ = lm_checkpoint.load_model(policy_run)
    batch = int(config.train.batch_size)
    train_rows, held_rows = with_reference(reference, train_rows, batch), with_reference(reference, held_rows, batch)
    del reference
    run_dir = pathlib.Path(workdir) / config.dpo.get("run_dir", RUN_DIR)
    meta = reward.tokenizer_meta(tokenizer, policy_run, source_meta)
    summary = loop.train(config, run_dir, objective(config, train_rows, held_rows, policy_run, meta),
                         stop_after=stop_after)
    from lm.train import metrics as lm_metrics
    evals = [r for r in lm_metrics.read_metrics(run_dir / "metrics.jsonl") if "val_reward_accuracy" in r]
    report = dict(summary, data=data_report, beta=float(config.dpo.beta),
                  held_out_before=dict(reward_accuracy=0.5, reward_margin=0.0),
                  held_out={k[4:]: v for k, v in evals[-1].items() if k.startswith("val_")} if evals else None,
                  held_out_curve=[dict(step=r["step"], accuracy=r["val_reward_accuracy"],
                                       margin=r["val_reward_margin"]) for r in evals])
    (run_dir / "dpo_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report

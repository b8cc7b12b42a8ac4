"""RLHF throughput of lm vs TRL on CPU, one run: reward-model training (pairs/s) and one PPO update split into
rollout / scoring / training, on the same tiny GPT-2, the same weights, the same tokens.

    python benchmarks/bench_rlhf.py [--steps=10] [--threads=1,2] [--trl_python=/work/venv-trl/bin/python]
        [--trl_ppo_python=/work/venv-trl112/bin/python]

Fair-comparison rules: one random GPT-2 (lm.model.Transformer) exported through lm.model.hf, so both sides start
from identical weights; one tokenizer (ours, exported as an HF tokenizer through lm.tokenizer.huggingface) and the
same pre-tokenized pairs and prompts; float32 on both sides (TRL: bf16 off, gradient checkpointing off, dropout
off); the same batch, lengths, optimizer (AdamW) and PPO shape (rollout batch, minibatches, epochs, new tokens). TRL
runs in its own venv, once per torch thread count, in worker processes of this script (`--worker=...`), so nothing
of TRL is imported by lm or by this process. Peers: TRL 1.16 RewardTrainer; PPO was removed from TRL after 1.12, so
the PPO side is trl==1.12.0's trl.experimental.ppo.PPOTrainer in a separate venv (pre-tokenized prompts, an
explicit reference model); its phases are timed by wrapping its generation (rollout), reward/value forward passes
(scoring) and the rest of the update (training). Each side's first update (compilation, warm-up) is left out and
each part is the median over the other updates (TRL: per update, from a callback after each one; until 2026-12-03
TRL's parts were means over all updates with the first included, which flattered us).

Reward-model tokens: TRL's collator pads each batch of 2B rows (chosen, then rejected) to its longest row; ours
lays each pair out as one row, the shared prompt once and each answer blind to the other (lm.train.reward.pack_pairs;
the same scores as two rows), padded to a bucket width of the batch's longest row. Both sides record the tokens
(padding included) they run per step (reward_tokens_per_step); ours also with RM_LEVERS (ours.reward_levers).

Contention: each part (ours, every TRL worker) records the foreign CPU load while it ran (busy CPU time from
/proc/stat less this process's and its workers', over the wall time; benchmarks/quiet.py). Above --max_foreign_load
cores the run is marked CONTENDED, benchmarks/results/rlhf_cpu.json is not written and the exit code is 3. The quiet
run (alone on the machine):

    ../shared/tools/quiet-run -- python benchmarks/bench_rlhf.py

A smoke run (proves the script works; its times are not results): --steps=2 --threads=1 --no_save.
"""
import argparse
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "rlhf_cpu.json"
QUIET_COMMAND = "../shared/tools/quiet-run -- python benchmarks/bench_rlhf.py"
sys.path.insert(0, str(REPO))
SHAPE = dict(n_layers=2, d_model=128, n_heads=4, d_ff=512, max_len=128)
RM = dict(batch=16, seq_len=96, pairs=256)
# The reward model is timed twice: with the model config as it is, and with this compute-path switch of config.model
# (same parameters; tests/test_attention.py), recorded apart as ours.reward_levers (flat_matmuls is the default now).
RM_LEVERS = dict(fused_qkv=True)
PPO = dict(rollout_batch=32, minibatches=2, epochs=2, max_new_tokens=24, max_prompt_tokens=32)


# --- shared inputs (our side builds them; the TRL workers read them) -----------------------------------------------

def prepare(out: pathlib.Path) -> dict:
    """Tokenizer, model weights (ours and HF), pre-tokenized pairs and prompts under `out`."""
    import ml_collections
    from flax import nnx

    from lm import config as lm_config
    from lm.data import preferences
    from lm.model import Transformer, hf
    from lm.tokenizer import chat, huggingface
    from lm.tokenizer import train as tokenizer_train
    from lm.train import ppo, reward
    from pydoc_data.topics import topics

    tok = tokenizer_train.train([t for _, t in sorted(topics.items())[:150]], vocab_size=1024)
    tok.save(out / "tokenizer")
    huggingface.to_hf(tok).save(str(out / "tokenizer.json"))
    overrides = {f"model.{k}": v for k, v in SHAPE.items()}
    config = lm_config.load("configs/tiny.py", {**overrides, "model.vocab_size": tok.n_vocab,
                                                "model.n_kv_heads": SHAPE["n_heads"], "model.dtype": "float32"})
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    hf.export_hf(model, config.model, out / "hf_model", pad_token_id=chat.pad_id(tok),
                 eos_token_id=tok.token_id(chat.ASSISTANT_END), bos_token_id=tok.eot_id)
    rows = preferences.tokenize_pairs(tok, reward.synthetic_pairs(RM["pairs"]), RM["seq_len"] - 1)
    pairs = [dict(chosen_ids=rows["chosen_ids"][i, :rows["chosen_lengths"][i]].tolist(),
                  rejected_ids=rows["rejected_ids"][i, :rows["rejected_lengths"][i]].tolist())
             for i in range(len(rows["chosen_ids"]))]
    pool, _ = ppo.prompt_pool(ml_collections.ConfigDict(dict(
        prompts="synthetic", n_prompts=PPO["rollout_batch"] * 4, max_prompt_tokens=PPO["max_prompt_tokens"])), tok, 0)
    spec = dict(dir=str(out), pad_id=chat.pad_id(tok), eos_id=tok.token_id(chat.ASSISTANT_END), pairs=pairs,
                prompts=[p["ids"] for p in pool], rm=RM, ppo=PPO, vocab=tok.n_vocab)
    (out / "spec.json").write_text(json.dumps(spec))
    return dict(spec, config=config, model=model, tok=tok, rows=rows, pool=pool)


# --- our side ------------------------------------------------------------------------------------------------------

def block(tree):
    import jax
    return jax.block_until_ready(tree)


def ours_reward(prep: dict, steps: int, mesh, levers=None) -> dict:
    """Reward model: pairs per second of the train step (under `mesh`), with config.model updated by `levers`."""
    import ml_collections

    from lm.train import loop, reward

    rm_config = ml_collections.ConfigDict(prep["config"].to_dict())
    rm_config.model.update(levers or {})
    rm_config.reward = ml_collections.ConfigDict(dict(margin=0.0, center_coef=0.0))
    rm_config.train.update(batch_size=RM["batch"], seq_len=RM["seq_len"], warmup_steps=0, grad_clip=0.0,
                           weight_decay=0.0)
    rows = prep["rows"]
    objective = reward.objective(rm_config, rows, rows)
    # The objective's own batches: one row a pair (the prompt shared, lm.train.reward.pack_pairs), each batch cut to
    # the bucket width of its longest row (TRL pads each batch of 2B rows to its longest row). The step is compiled
    # (and run once, untimed) per shape, as the Trainer compiles it.
    batches = [loop.global_batch(b, mesh) for b in itertools.islice(objective.train_batches(0), steps + 1)]
    state, steps_by_shape = None, {}
    for b in batches:
        shape = b["tokens"].shape
        if shape not in steps_by_shape:
            fresh, steps_by_shape[shape] = loop.fresh_state_and_step(objective, rm_config.train, mesh, b)
            state = fresh if state is None else state
            state, _ = block(steps_by_shape[shape](state, b))  # warm
    times = []
    for b in batches[1:]:
        tick = time.perf_counter()
        state, _ = block(steps_by_shape[b["tokens"].shape](state, b))
        times.append(time.perf_counter() - tick)
    return {"reward_pairs_per_sec": RM["batch"] / statistics.median(times), "reward_step_seconds": times,
            "reward_shapes": sorted(list(shape) for shape in steps_by_shape),
            "reward_tokens_per_step": statistics.mean(b["tokens"].size for b in batches[1:])}


def ours(prep: dict, steps: int) -> dict:
    import jax
    import ml_collections
    from flax import nnx

    from lm import mesh as lm_mesh
    from lm import sample
    from lm.model import TransformerWithScalarHead
    from lm.tokenizer import chat
    from lm.train import loop, ppo
    from configs import ppo_tiny

    config, tok = prep["config"], prep["tok"]
    mesh = lm_mesh.make_mesh(dict(data=jax.device_count(), fsdp=1, tensor=1))  # the host devices (XLA_FLAGS)
    with jax.set_mesh(mesh):
        result = ours_reward(prep, steps, mesh)
        result["reward_levers"] = dict(ours_reward(prep, steps, mesh, RM_LEVERS), levers=RM_LEVERS)

        # PPO: one update = a rollout (sample), scoring (value, reference and reward passes, KL, GAE: one jit) and
        # epochs x minibatches optimizer steps.
        pc = ml_collections.ConfigDict(config.to_dict())
        pc.ppo = ppo_tiny.ppo_section(rollout_batch=PPO["rollout_batch"], minibatches=PPO["minibatches"],
                                      epochs=PPO["epochs"], max_new_tokens=PPO["max_new_tokens"],
                                      max_prompt_tokens=PPO["max_prompt_tokens"])
        pc.train.update(batch_size=PPO["rollout_batch"] // PPO["minibatches"], warmup_steps=0, grad_clip=1.0,
                        weight_decay=0.0)
        rollouts = ppo.Rollouts(pc, tok, prep["pool"], None, None, tempfile.mkdtemp())
        reference = prep["model"]
        reward_model = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(1), head_init_std=0.1)
        rollouts.mesh, rollouts.stats = mesh, {"mean": 0.0, "std": 1.0}
        rollouts.frozen = dict(reference=nnx.split(reference), reward=nnx.split(reward_model))
        objective = ppo.objective(pc, rollouts, None, {})
        policy = TransformerWithScalarHead(config.model, rngs=nnx.Rngs(0))
        phases = {"rollout": [], "scoring": [], "training": []}
        state = step = None
        for index in range(steps + 1):
            model = policy if state is None else objective_model(objective, state)
            timed = rollout_phases(rollouts, model, index, tok, sample, chat)
            data, _ = rollouts.rollout(model, index)  # the real code path, for the batches (not timed)
            minibatches = [{k: v[i::PPO["minibatches"]] for k, v in data.items()} for i in range(PPO["minibatches"])]
            if state is None:
                state, step = loop.fresh_state_and_step(objective, pc.train, mesh,
                                                        loop.global_batch(minibatches[0], mesh))
            tick = time.perf_counter()
            for _ in range(PPO["epochs"]):
                for mb in minibatches:
                    state, m = block(step(state, loop.global_batch(mb, mesh)))
            timed["training"] = time.perf_counter() - tick
            if index:  # the first round compiles
                for k in phases:
                    phases[k].append(timed[k])
        result["ppo_seconds"] = {k: statistics.median(v) for k, v in phases.items()}
        result["ppo_seconds"]["update"] = sum(result["ppo_seconds"].values())
    result.update(host_devices=jax.device_count(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    return result


_SPECS = {}


def objective_model(objective, state):
    """The live policy of a benchmark state (as Trainer.current_model merges it)."""
    from flax import nnx
    if id(objective) not in _SPECS:
        graphdef, _, rest = nnx.split(nnx.eval_shape(objective.make_model), nnx.Param, ...)
        _SPECS[id(objective)] = (graphdef, rest)
    graphdef, rest = _SPECS[id(objective)]
    return nnx.merge(graphdef, state["params"], rest)


def rollout_phases(rollouts, model, index, tok, sample, chat):
    """Wall time of the sampling and of the scoring of rollout `index` (the same calls Rollouts.rollout makes; the
    scoring includes the sampler-vs-trainer log-prob check on every config.ppo.drift_every-th rollout)."""
    import jax
    items = rollouts.prompts_of(index)
    prompts = [item["ids"] for item in items]
    tick = time.perf_counter()
    out = sample.generate_ids(model, prompts, jax.random.fold_in(jax.random.key(0), index), PPO["max_new_tokens"],
                              sample.Sampling(), stop_ids=[tok.token_id(chat.ASSISTANT_END)], vocab_size=tok.n_vocab,
                              values=True)
    rolled = time.perf_counter()
    block(rollouts.score(model, prompts, out, index))  # Rollouts.rollout's own scoring call
    return {"rollout": rolled - tick, "scoring": time.perf_counter() - rolled}


# --- TRL workers (run with the TRL venv's python) ------------------------------------------------------------------

def trl_reward_worker(spec: dict, steps: int, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(threads)
    directory = pathlib.Path(spec["dir"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), pad_token="<|pad|>",
                                        eos_token="<|assistant_end|>")
    model = AutoModelForSequenceClassification.from_pretrained(directory / "hf_model", num_labels=1,
                                                               torch_dtype=torch.float32)
    model.config.pad_token_id = spec["pad_id"]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.tick = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.tick)

    args = RewardConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=spec["rm"]["batch"],
                        max_steps=steps + 1, learning_rate=1e-3, bf16=False, fp16=False, use_cpu=True,
                        gradient_checkpointing=False, disable_dropout=True, report_to=[], logging_steps=10 ** 6,
                        save_strategy="no", max_length=spec["rm"]["seq_len"], dataloader_num_workers=0,
                        center_rewards_coefficient=None, lr_scheduler_type="constant", warmup_steps=0)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(spec["pairs"]), callbacks=[Timer()])
    collate, widths = trainer.data_collator, []

    def recording_collate(examples):  # TRL pads each batch to its longest row: record the widths it ran
        out = collate(examples)
        widths.append(out["input_ids"].shape[1])
        return out
    trainer.data_collator = recording_collate
    trainer.train()
    return {"reward_pairs_per_sec": spec["rm"]["batch"] / statistics.median(times[1:]), "reward_step_seconds": times,
            "reward_tokens_per_step": statistics.mean(2 * spec["rm"]["batch"] * w for w in widths[1:])}


def trl_ppo_worker(spec: dict, steps: int, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(threads)
    directory = pathlib.Path(spec["dir"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), pad_token="<|pad|>",
                                        eos_token="<|assistant_end|>")
    tokenizer.padding_side = "left"

    def causal():
        return AutoModelForCausalLM.from_pretrained(directory / "hf_model", torch_dtype=torch.float32)

    def scalar():
        m = AutoModelForSequenceClassification.from_pretrained(directory / "hf_model", num_labels=1,
                                                               torch_dtype=torch.float32)
        m.config.pad_token_id = spec["pad_id"]
        return m

    phases = {"rollout": 0.0, "scoring": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            tick = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - tick
        return wrapper

    trl_ppo.batch_generation = timed("rollout", trl_ppo.batch_generation)
    trl_ppo.get_reward = timed("scoring", trl_ppo.get_reward)  # the value and reward passes of a rollout
    reference = causal()
    plain_forward, scoring_forward = trl_ppo.forward, timed("scoring", trl_ppo.forward)
    # trl's `forward` also runs the policy in the PPO epochs (training); only the reference's pass is scoring.
    trl_ppo.forward = lambda model, *a, **k: (scoring_forward if model is reference else plain_forward)(model, *a, **k)
    p = spec["ppo"]
    n = p["rollout_batch"]
    # TRL 1.12: one update's rollout = per_device_train_batch_size * gradient_accumulation_steps, split into
    # num_mini_batches minibatches.
    args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n,
                     gradient_accumulation_steps=1, num_mini_batches=p["minibatches"],
                     local_rollout_forward_batch_size=n, lr_scheduler_type="constant",
                     num_ppo_epochs=p["epochs"], response_length=p["max_new_tokens"], total_episodes=n * (steps + 1),
                     stop_token="eos", temperature=1.0, kl_coef=0.05, learning_rate=3e-5, bf16=False, fp16=False,
                     use_cpu=True, gradient_checkpointing=False, report_to=[], logging_steps=10 ** 6,
                     save_strategy="no", num_sample_generations=0, missing_eos_penalty=1.0)
    marks = []  # (time, phase totals so far) at the start and after every update

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), dict(phases)))

        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), dict(phases)))

    prompts = Dataset.from_list([{"input_ids": ids} for ids in spec["prompts"]])
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=causal(), ref_model=reference,
                         reward_model=scalar(), value_model=scalar(), train_dataset=prompts, callbacks=[Marks()])
    trainer.train()
    if len(marks) != steps + 2:
        raise RuntimeError(f"TRL PPO: {len(marks) - 1} update marks for {steps + 1} updates")
    per_update = []
    for (t0, p0), (t1, p1) in zip(marks, marks[1:]):
        update = {k: p1[k] - p0[k] for k in phases}
        update.update(training=t1 - t0 - update["rollout"] - update["scoring"], update=t1 - t0)
        per_update.append(update)
    # as ours: the first update (warm-up) left out, the median of each part over the others
    per = {k: statistics.median(u[k] for u in per_update[1:]) for k in ("rollout", "scoring", "training")}
    per["update"] = sum(per.values())  # as ours: the sum of the parts' medians
    return {"ppo_seconds": per, "update_seconds": [u["update"] for u in per_update],
            "note": "TRL per-update times: medians over the updates after the first, as ours"}


WORKERS = {"trl_reward": trl_reward_worker, "trl_ppo": trl_ppo_worker}


def run_worker(python: str, name: str, spec_path: pathlib.Path, steps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    done = subprocess.run([python, __file__, f"--worker={name}", f"--spec={spec_path}", f"--steps={steps}",
                           f"--threads={threads}"], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        return {"error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured(loads: dict, name: str, fn, *args):
    """fn(*args), with the foreign load while it ran recorded as loads[name]."""
    from benchmarks import quiet   # imported here: TRL workers never need it
    with quiet.ForeignLoad() as load:
        out = fn(*args)
    loads[name] = dict(foreign_load_cores=load.cores, seconds=round(load.wall, 1))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--trl_python", default="/work/venv-trl/bin/python")
    parser.add_argument("--trl_ppo_python", default="/work/venv-trl112/bin/python")
    parser.add_argument("--worker", default="")
    parser.add_argument("--spec", default="")
    parser.add_argument("--no_save", action="store_true")
    parser.add_argument("--host_devices", type=int, default=1,
                        help="our side data-parallel over this many host devices (XLA_FLAGS="
                             "--xla_force_host_platform_device_count; recorded as ours.host_devices)")
    parser.add_argument("--max_foreign_load", type=float, default=0.1,
                        help="foreign busy cores above which the run is contended (results not written)")
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](json.loads(pathlib.Path(args.spec).read_text()), args.steps, int(args.threads))
        print(json.dumps(result))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.host_devices > 1:  # before jax is imported (prepare imports it)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.host_devices}").strip()
    print(f"quiet run: {QUIET_COMMAND}", flush=True)
    out = pathlib.Path(tempfile.mkdtemp(prefix="bench_rlhf_"))
    prep = prepare(out)
    loads = {}
    result = dict(shape=SHAPE, rm=RM, ppo=PPO, steps=args.steps, command="python benchmarks/bench_rlhf.py " +
                  " ".join(sys.argv[1:]), quiet_run=os.environ.get("QUIET_RUN") == "1",
                  ours=measured(loads, "ours", ours, prep, args.steps), trl={})
    for threads in [int(t) for t in args.threads.split(",")]:
        for name, python, worker in ((f"reward_threads_{threads}", args.trl_python, "trl_reward"),
                                     (f"ppo_threads_{threads}", args.trl_ppo_python, "trl_ppo")):
            result["trl"][name] = measured(loads, f"trl_{name}", run_worker, python, worker, out / "spec.json",
                                           args.steps, threads)
    best_rm = max((v.get("reward_pairs_per_sec", 0) for k, v in result["trl"].items() if k.startswith("reward")),
                  default=0)
    best_ppo = min((v["ppo_seconds"]["update"] for k, v in result["trl"].items()
                    if k.startswith("ppo") and "ppo_seconds" in v), default=0)
    result["ratio_reward_pairs_per_sec"] = result["ours"]["reward_pairs_per_sec"] / best_rm if best_rm else None
    result["ratio_reward_pairs_per_sec_levers"] = (result["ours"]["reward_levers"]["reward_pairs_per_sec"] / best_rm
                                                   if best_rm else None)
    result["ratio_ppo_update_time"] = best_ppo / result["ours"]["ppo_seconds"]["update"] if best_ppo else None
    foreign = max(v["foreign_load_cores"] for v in loads.values())  # the worst part decides
    result.update(parts=loads, foreign_load_cores=foreign, max_foreign_load=args.max_foreign_load,
                  verdict="CONTENDED" if foreign > args.max_foreign_load else "OK")
    print(json.dumps(result, indent=2))
    if result["verdict"] != "OK":
        print(f"CONTENDED: foreign load {foreign} cores (limit {args.max_foreign_load}): {RESULTS} not written; "
              f"these figures are not a result. Quiet run: {QUIET_COMMAND}", file=sys.stderr)
        sys.exit(3)
    if not args.no_save:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

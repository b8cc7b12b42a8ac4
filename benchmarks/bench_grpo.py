"""GRPO step time (rollout + update) of lm.train.grpo vs TRL's GRPOTrainer, on the same tiny GPT-2 weights on CPU.

    ../shared/tools/quiet-run python benchmarks/bench_grpo.py [--trl_python=/work/venv-trl/bin/python]
        [--threads=1,2] [--prompts=4 --group=8 --new_tokens=32 --steps=20]

One random tiny GPT-2 (configs/tiny.py's model: 2 layers, d 128, this script's 2,048-token BPE) is saved as our
run and exported through lm.model.hf for transformers, with our tokenizer's HF tokenizer.json on both sides, so both
start from the same weights and see the same prompt ids (arithmetic prompts in our chat template). Each step: P
prompts x G samples of up to `new_tokens` tokens (TRL: exactly that, min_new_tokens and no eos; ours stops only at
<|assistant_end|>, which a random model rarely produces; the generated-token count of each side is reported, so
tokens/s compare even where a row stops early), then one optimizer update (beta 0, one iteration per rollout, AdamW,
float32).
TRL 1.16 runs offline on CPU with use_vllm=False, bf16=False, no gradient checkpointing, disable_dropout=True;
its per_device_train_batch_size counts completions (P x G). Each side runs in its own process pinned to `threads`
cores (sched_setaffinity; torch.set_num_threads / XLA's CPU thread pool follow it). The first step (compilation,
warm-up) is reported apart; the median of the others is the step time (our last step also writes the loop's
final checkpoint: timed as checkpoint_s and left out of that step's time, as TRL's side saves nothing); each side's
faster thread count is compared with the other's too. Ours also reports the split: median_sample_s (the sampler
alone) and median_update_s (the train step); the rest of a step is rewards and layout. TRL lives in its own venv, never in ours.
--ours_devices=1,2 also runs our side over 2 XLA host devices (its mesh's data axis: rows split over the cores,
gradients all-reduced in process), reported as ours_<threads>_dp2.

The foreign CPU load during each side's run (busy CPU time from /proc/stat minus that side's own, over its wall time)
is recorded as in bench_train.py; above --max_foreign_load cores the run is CONTENDED: the figures are printed, marked,
and --out (benchmarks/results/grpo_bench.json) is not written (exit code 3). A smoke run at tiny size:

    python benchmarks/bench_grpo.py --threads=1 --prompts=2 --group=4 --new_tokens=8 --steps=3 --out=/tmp/g.json
"""
import argparse
import json
import os
import pathlib
import shutil
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.quiet import busy_cpu_seconds, machine, own_cpu_seconds  # noqa: E402
VOCAB = 2048


# ------------------------------------------------------------------------------------------------ shared setup (ours)

def prepare(directory: pathlib.Path, prompts: int, model_config: str = "configs/tiny.py", hf_export: bool = True) -> dict:
    """Tokenizer, a random model of model_config's shape as a run (W/sft) and in HF format (W/hf, if hf_export),
    and the prompt texts."""
    import pydoc_data.topics

    from lm import config as lm_config
    from lm.eval import tasks, tiny_runs
    from lm.model import hf
    from lm.tokenizer import chat

    docs = list(pydoc_data.topics.topics.values())[:80]
    tok = tiny_runs.arithmetic_tokenizer(VOCAB, directory / "tokenizer", extra_texts=docs, problems=200)
    config = lm_config.load(model_config, {"model.vocab_size": tok.n_vocab})
    model = tiny_runs.random_run(directory / "sft", config, tok)
    if hf_export:
        hf.export_hf(model, config.model, directory / "hf", bos_token_id=tok.eot_id, eos_token_id=tok.eot_id,
                     pad_token_id=chat.pad_id(tok))
    examples = tasks.Arithmetic().examples("train", prompts, seed=0)
    prompt_texts = [tok.decode(chat.render_for_completion(tok, e.prompt)) for e in examples]
    return dict(tokenizer_json=str(directory / "tokenizer" / "tokenizer.json"), prompts=prompt_texts,
                pad=chat.pad_id(tok), eot=tok.eot_id, n_vocab=tok.n_vocab)


def pin(threads: int) -> None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))


# ------------------------------------------------------------------------------------------------ ours

def run_ours(directory: pathlib.Path, args) -> dict:
    from lm import checkpoint, config as lm_config
    from lm.eval import tiny_runs
    from lm.train import grpo, loop

    overrides = {"grpo.prompts": args.prompts, "grpo.group_size": args.group, "grpo.max_new_tokens": args.new_tokens,
                 "grpo.prompt_len": 32, "grpo.minibatches": 1, "grpo.eval_problems": 0, "grpo.train_problems": 256,
                 "train.steps": args.steps, "train.eval_every": 0, "train.checkpoint_every": 0,
                 "train.seq_len": 32 + args.new_tokens - 1, "train.lr": 1e-3}
    config = lm_config.load("configs/grpo_tiny.py", overrides)
    init = directory / "sft"
    _, tok, init_config, init_meta = checkpoint.load_run(init)
    config = grpo.with_init_model(config, init_config)
    grpo.check_config(config)
    objective = grpo.objective(config, directory, tok, tiny_runs.HasDigit(), {}, init)
    times, tokens, saves, rollouts, updates = [], [], [], [], []
    run_dir = directory / f"ours_{args.threads}_{args.ours_devices}"
    with loop.Trainer(config, run_dir, objective) as trainer:
        save = trainer.save

        def timed_save():  # the loop checkpoints at the last step (TRL here: save_strategy "no"): reported apart
            tick = time.perf_counter()
            save()
            saves.append(time.perf_counter() - tick)
        trainer.save = timed_save
        batches = trainer.train_batches()
        for _ in range(args.steps):
            saved = len(saves)
            tick = time.perf_counter()
            batch = next(batches)
            sampled = time.perf_counter()
            trainer.step(batch)
            saving = sum(saves[saved:])                          # the last step's checkpoint: not a step's work
            times.append(time.perf_counter() - tick - saving)
            tokens.append(float(batch["loss_mask"].sum()))
            rollouts.append(batch["metrics"]["rollout_sec"])    # the sampler alone
            updates.append(time.perf_counter() - sampled - saving)   # the train step
    return dict(times=times, generated_tokens=tokens, checkpoint_s=saves, sample_s=rollouts, update_s=updates)


# ------------------------------------------------------------------------------------------------ TRL

def run_trl(directory: pathlib.Path, setup: dict, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=setup["tokenizer_json"], pad_token="<|pad|>",
                                        eos_token="<|endoftext|>")
    model = GPT2LMHeadModel.from_pretrained(directory / "hf", torch_dtype=torch.float32)
    # No stop: every completion has exactly new_tokens tokens (as ours, where a random model rarely ends a turn).
    model.generation_config.eos_token_id = None

    def has_digit(completions, **kwargs):
        return [float(any(c.isdigit() for c in text)) for text in completions]

    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.tick = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.tick)

    rows = args.prompts * args.group
    dataset = Dataset.from_dict({"prompt": setup["prompts"] * (args.steps + 1)})
    config = GRPOConfig(
        output_dir=str(directory / f"trl_{args.threads}"), per_device_train_batch_size=rows,
        num_generations=args.group, max_completion_length=args.new_tokens, max_steps=args.steps,
        learning_rate=1e-3, beta=0.0, num_iterations=1, temperature=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_dropout=True, use_vllm=False, use_cpu=True, logging_steps=1,
        report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0, shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": args.new_tokens})
    trainer = GRPOTrainer(model=model, reward_funcs=has_digit, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    lengths = [r.get("completions/mean_length") for r in trainer.state.log_history if "completions/mean_length" in r]
    tokens = [float(length) * rows for length in lengths]
    return dict(times=times, generated_tokens=tokens)


# ------------------------------------------------------------------------------------------------ driver

def summarise(result: dict) -> dict:
    times, tokens = result["times"], result["generated_tokens"]
    rest = times[1:] or times
    per_step_tokens = statistics.median(tokens[1:] or tokens) if tokens else None
    median = statistics.median(rest)
    return dict(first_step_s=times[0], median_step_s=median, steps=len(times),
                generated_tokens_per_step=per_step_tokens,
                generated_tokens_per_s=per_step_tokens / median if per_step_tokens else None, times=times,
                **({"checkpoint_s": result["checkpoint_s"]} if "checkpoint_s" in result else {}),
                **{f"median_{name}": statistics.median(result[name][1:] or result[name])
                   for name in ("sample_s", "update_s") if name in result})


def child(args) -> None:
    pin(args.threads)
    directory = pathlib.Path(args.dir)
    setup = json.loads((directory / "setup.json").read_text())
    result = run_ours(directory, args) if args.side == "ours" else run_trl(directory, setup, args)
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl_python", default="/work/venv-trl/bin/python")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ours_devices", default="1",
                        help="host devices for our side (comma list; XLA_FLAGS=--xla_force_host_platform_device_count"
                             "=N, the rows split over them: data parallelism across cores); N > threads is skipped")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", default="/tmp/bench_grpo")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grpo_bench.json"))
    parser.add_argument("--max_foreign_load", type=float, default=0.1,
                        help="foreign busy cores above which the run is contended (and --out not written)")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.threads, args.ours_devices = int(args.threads), int(args.ours_devices)
        return child(args)

    directory = pathlib.Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)   # scratch: a rerun must not find the last run's checkpoints
    directory.mkdir(parents=True)
    setup = prepare(directory, args.prompts)
    (directory / "setup.json").write_text(json.dumps(setup))
    common = [f"--dir={directory}", f"--prompts={args.prompts}", f"--group={args.group}",
              f"--new_tokens={args.new_tokens}", f"--steps={args.steps}"]
    results = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        runs = [("ours", sys.executable, n) for n in map(int, args.ours_devices.split(",")) if n <= threads]
        for side, python, devices in runs + [("trl", args.trl_python, 1)]:
            name = f"{side}_{threads}" + (f"_dp{devices}" if devices > 1 else "")
            env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                       HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                       OMP_NUM_THREADS=str(threads),
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "")
            busy, own, wall = busy_cpu_seconds(), own_cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
            out = subprocess.run([python, __file__, f"--side={side}", f"--threads={threads}",
                                  f"--ours_devices={devices}", *common], cwd=REPO, env=env, capture_output=True,
                                 text=True)
            wall = time.perf_counter() - wall
            foreign = max(0.0, busy_cpu_seconds() - busy - (own_cpu_seconds(resource.RUSAGE_CHILDREN) - own)) / wall
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{side} with {threads} threads failed:\n{out.stderr[-4000:]}")
            results[name] = dict(summarise(json.loads(line[-1][len("RESULT "):])), devices=devices,
                                 foreign_load_cores=round(foreign, 3), wall_s=round(wall, 1))
            print(name, {k: v for k, v in results[name].items() if k != "times"}, flush=True)
    step = {name: r["median_step_s"] for name, r in results.items()}
    ratios = {f"trl_over_{name}_step_time": step[f"trl_{name.split('_')[1]}"] / v for name, v in step.items()
              if name.startswith("ours_")}
    best = {side: min(v for name, v in step.items() if name.startswith(side + "_")) for side in ("ours", "trl")}
    ratios["trl_best_over_ours_best_step_time"] = best["trl"] / best["ours"]   # each at its faster thread count
    foreign = max(r["foreign_load_cores"] for r in results.values())
    verdict = "CONTENDED" if foreign > args.max_foreign_load else "OK"
    result = dict(prompts=args.prompts, group=args.group, new_tokens=args.new_tokens, steps=args.steps,
                  ours_devices=args.ours_devices,
                  verdict=verdict, foreign_load_cores=foreign, max_foreign_load=args.max_foreign_load,
                  quiet_run=os.environ.get("QUIET_RUN") == "1", load_average=list(os.getloadavg()),
                  cpu_count=os.cpu_count(), machine=machine(), ratios=ratios, results=results)
    print(json.dumps(ratios, indent=1))
    if verdict == "CONTENDED":
        print(json.dumps(result))
        print(f"CONTENDED: foreign load {foreign} cores (limit {args.max_foreign_load}): {args.out} not written; "
              "these figures are not a result", file=sys.stderr)
        sys.exit(3)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""GRPO step time split into rollout and update on whatever device jax finds: benchmarks/device_check.sh's stage 4.

A random model of --model_config's shape (default: the gpt2_124m body, with bench_grpo's 2,048-token BPE as its
vocabulary) is saved as an SFT run; lm.train.grpo then runs --steps steps of P prompts x G samples of up to
--new_tokens tokens (reward: any digit in the answer, so a random model gets some signal) through the same code as
benchmarks/bench_grpo.py's side of the CPU comparison with TRL (bench_grpo.run_ours). The first step (compilation)
is reported apart; of the others the median step, the sampler's part (rollout) and the train step's (update).
Imports no TensorFlow.

    python benchmarks/gpu_grpo.py [--model_config=configs/gpt2_124m.py --prompts=16 --group=8 --new_tokens=128]
    python benchmarks/gpu_grpo.py --model_config=configs/tiny.py --prompts=2 --group=4 --new_tokens=8 --steps=3
"""
import argparse
import json
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import bench_grpo  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", default="configs/gpt2_124m.py")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/gpu_grpo")
    parser.add_argument("--output", help="also write the summary as JSON here")
    args = parser.parse_args()
    args.threads = 0  # bench_grpo.run_ours names its run directory after the thread count; none is pinned here

    import jax
    from lm import config as lm_config
    from lm import model as lm_model

    directory = pathlib.Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)   # scratch: a rerun must not resume the last run's checkpoints
    directory.mkdir(parents=True)
    setup = bench_grpo.prepare(directory, args.prompts, model_config=args.model_config, hf_export=False)
    result = bench_grpo.summarise(bench_grpo.run_ours(directory, args))
    model = lm_config.load(args.model_config, {"model.vocab_size": setup["n_vocab"]}).model
    summary = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, model_config=args.model_config,
                   params=lm_model.param_count(model), dtype=model.dtype, prompts=args.prompts, group=args.group,
                   new_tokens=args.new_tokens, tensorflow_imported="tensorflow" in sys.modules,
                   **{k: v for k, v in result.items() if k != "times"}, times=result["times"])
    print(f"GRPO step: median {summary['median_step_s']:.3f} s (rollout {summary['median_sample_s']:.3f} s, "
          f"update {summary['median_update_s']:.3f} s), first step {summary['first_step_s']:.1f} s, "
          f"{summary['generated_tokens_per_s'] or 0:,.0f} generated tokens/s", flush=True)
    print(json.dumps(summary))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

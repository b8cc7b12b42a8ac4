"""python -m lm.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N]

Runs the objective `config.objective` names (pretrain, sft, reward, dpo, ppo, grpo): the module
lm.train.<objective> and its `run(config, workdir)`. Pretraining reads <workdir>/tokens and writes to <workdir>;
a post-training objective writes its own run directory inside the workdir (<workdir>/sft/, ...). Re-running on a
workdir with checkpoints resumes from the latest one; --config.train.steps is the total number of steps.
"""
import importlib
import json

from absl import app, flags, logging

from lm import config as lm_config
from lm import mesh as lm_mesh

OBJECTIVES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")

_CONFIG = lm_config.define_config_flag()
lm_mesh.define_distributed_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline workdir (tokens/, tokenizer/; each objective's run dir).")
flags.mark_flag_as_required("workdir")


def objective_module(config):
    """The module lm.train.<config.objective>; an unknown or not yet built objective is an error naming the key."""
    name = config.get("objective", "pretrain")
    if name not in OBJECTIVES:
        raise lm_config.ConfigError(f"config.objective={name!r}: must be one of {', '.join(OBJECTIVES)}")
    try:
        return importlib.import_module(f"lm.train.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"lm.train.{name}":
            raise
        raise lm_config.ConfigError(f"config.objective={name!r}: lm/train/{name}.py does not exist yet") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    lm_mesh.initialize_distributed()
    config = lm_config.validate(_CONFIG.value)
    summary = objective_module(config).run(config, _WORKDIR.value)
    logging.info("done: %s", json.dumps(summary, default=str))
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    app.run(main)

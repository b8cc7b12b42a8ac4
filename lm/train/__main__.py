"""python -m lm.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N]

Pretrains on <workdir>/tokens; re-running on a workdir with checkpoints resumes from the latest one, and
--config.train.steps is the total number of steps.
"""
import json

from absl import app, flags, logging

from lm import config as lm_config
from lm import mesh as lm_mesh

_CONFIG = lm_config.define_config_flag()
lm_mesh.define_distributed_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding tokens/; checkpoints and metrics go here.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lm.train import pretrain

    lm_mesh.initialize_distributed()
    config = lm_config.validate(_CONFIG.value)
    summary = pretrain.run(config, _WORKDIR.value)
    logging.info("done: %s", json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)

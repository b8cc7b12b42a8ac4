"""A grid sweep over config overrides: one run (and workdir) per combination.

    python launch/sweep.py --module=lm.train --config=configs/tiny.py --workdir=runs/sweep \
        --grid="train.lr=1e-3,3e-3" --grid="model.n_layers=2,4" [--launcher=local|slurm|print]

local runs them one after another here; slurm submits each with launch/slurm.sbatch; print only shows the commands.
"""
import itertools
import pathlib
import shlex
import subprocess
import sys

from absl import app, flags

LAUNCH = pathlib.Path(__file__).resolve().parent


def grid_commands(module, config, workdir, grid):
    """One command per point of the grid; the workdir name spells out the point."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise app.UsageError(f"--grid={item!r} is not key=v1,v2,...")
        axes.append([(key, v) for v in values.split(",")])
    for point in itertools.product(*axes):
        name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point) or "base"
        overrides = [f"--config.{k}={v}" for k, v in point]
        yield [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}/{name}", *overrides]


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    for command in grid_commands(FLAGS.module, FLAGS.config, FLAGS.workdir, FLAGS.grid):
        print(shlex.join(command), flush=True)
        if FLAGS.launcher == "local":
            subprocess.run(command, check=True)
        elif FLAGS.launcher == "slurm":
            subprocess.run(["sbatch", str(LAUNCH / "slurm.sbatch"), *command[2:]], check=True)


if __name__ == "__main__":
    flags.DEFINE_string("module", "lm.train", "Module each run executes.")
    flags.DEFINE_string("config", "configs/tiny.py", "Base config.")
    flags.DEFINE_string("workdir", "runs/sweep", "Parent directory; each run gets a subdirectory.")
    flags.DEFINE_multi_string("grid", [], "key=v1,v2,... (repeat for more axes).")
    flags.DEFINE_enum("launcher", "print", ["local", "slurm", "print"], "Where the runs go.")
    app.run(main)

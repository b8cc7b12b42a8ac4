"""A grid sweep over config overrides: one run (and workdir) per combination, sharing the data stages.

    python launch/sweep.py --module=lm.train --config=configs/tiny.py --workdir=runs/sweep \
        --grid="train.lr=1e-3,3e-3" --grid="model.n_layers=2,4" [--set=train.steps=200] [--data=PATHS] \
        [--launcher=local|slurm|print]

The data stages of lm.main (corpus, filter, tokenizer, tokenize) run once into <workdir>/data; each point's workdir
<workdir>/<point> gets `tokens` and `tokenizer` links to it, then runs `--module` there (lm.train, or lm.main, which
is given --stages=pretrain,sample). A grid over a data section (data, filter, tokenizer, dataset) gets one data
directory per value of those keys (<workdir>/data_<key>=<value>...). lm.main skips data stages that already ran, so
re-running a sweep reuses its data.

local runs everything here, one after another; slurm submits the data job, then each point with
launch/slurm.sbatch after it (sbatch --dependency=afterok); print only shows the commands.
"""
import dataclasses
import itertools
import os
import pathlib
import shlex
import subprocess
import sys

from absl import app, flags

LAUNCH = pathlib.Path(__file__).resolve().parent
DATA_SECTIONS = ("data", "filter", "tokenizer", "dataset")  # config sections the data stages read
DATA_STAGES = "corpus,filter,tokenizer,tokenize"
SHARED = ("tokens", "tokenizer")  # what a point's workdir links to its data directory


@dataclasses.dataclass
class Plan:
    data: dict      # data directory -> command that fills it
    points: list    # (workdir, data directory, command) per grid point


def parse_grid(grid) -> list:
    """--grid items "key=v1,v2" -> [[(key, v1), (key, v2)], ...], one list per axis."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise app.UsageError(f"--grid={item!r} is not key=v1,v2,...")
        axes.append([(key, v) for v in values.split(",")])
    return axes


def _name(pairs) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in pairs)


def plan(module, config, workdir, grid, overrides=(), data=()) -> Plan:
    """The data commands and one command per point of the grid; the workdir name spells out the point."""
    workdir = pathlib.Path(workdir)
    base = [f"--config={config}", *[f"--config.{o}" for o in overrides]]
    data_flag = [f"--data={','.join(data)}"] if data else []
    result = Plan(data={}, points=[])
    for point in itertools.product(*parse_grid(grid)):
        data_part = [(k, v) for k, v in point if k.split(".")[0] in DATA_SECTIONS]
        data_dir = workdir / ("data_" + _name(data_part) if data_part else "data")
        data_overrides = [f"--config.{k}={v}" for k, v in data_part]
        result.data.setdefault(data_dir, [sys.executable, "-m", "lm.main", *base, *data_overrides, *data_flag,
                                          f"--workdir={data_dir}", f"--stages={DATA_STAGES}"])
        point_dir = workdir / (_name(point) or "base")
        command = [sys.executable, "-m", module, *base, f"--workdir={point_dir}",
                   *[f"--config.{k}={v}" for k, v in point]]
        if module == "lm.main":
            command.append("--stages=pretrain,sample")  # the data stages are the shared ones
        result.points.append((point_dir, data_dir, command))
    return result


def link_data(point_dir: pathlib.Path, data_dir: pathlib.Path) -> None:
    """<point>/tokens and <point>/tokenizer as relative links into the data directory (they may dangle until the
    data job has run)."""
    point_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = point_dir / name
        target = pathlib.Path(os.path.relpath(data_dir / name, point_dir))
        if link.is_symlink() and pathlib.Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a link to {data_dir / name}; use a fresh --workdir")
        link.symlink_to(target, target_is_directory=True)


def run(the_plan: Plan, launcher: str) -> None:
    jobs = {}
    for data_dir, command in the_plan.data.items():
        print(shlex.join(command), flush=True)
        if launcher == "local":
            subprocess.run(command, check=True)
        elif launcher == "slurm":
            jobs[data_dir] = _sbatch(command[2:])
    for point_dir, data_dir, command in the_plan.points:
        print(f"# {point_dir}: {', '.join(SHARED)} -> {data_dir}", flush=True)
        print(shlex.join(command), flush=True)
        if launcher == "print":
            continue
        link_data(point_dir, data_dir)
        if launcher == "local":
            subprocess.run(command, check=True)
        else:
            _sbatch(command[2:], after=jobs[data_dir])


def _sbatch(module_args, after=None) -> str:
    dependency = [f"--dependency=afterok:{after}"] if after else []
    out = subprocess.run(["sbatch", "--parsable", *dependency, str(LAUNCH / "slurm.sbatch"), *module_args],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    run(plan(FLAGS.module, FLAGS.config, FLAGS.workdir, FLAGS.grid, FLAGS.set, FLAGS.data), FLAGS.launcher)


if __name__ == "__main__":
    flags.DEFINE_string("module", "lm.train", "Module each point runs: lm.train, or lm.main (pretrain + sample).")
    flags.DEFINE_string("config", "configs/tiny.py", "Base config.")
    flags.DEFINE_string("workdir", "runs/sweep", "Parent directory: data/ and one subdirectory per point.")
    flags.DEFINE_multi_string("grid", [], "key=v1,v2,... (repeat for more axes).")
    flags.DEFINE_multi_string("set", [], "key=value override for every point and the data stages (repeatable).")
    flags.DEFINE_list("data", [], "Corpus files or globs for the data stages (default: the config's, else bundled).")
    flags.DEFINE_enum("launcher", "print", ["local", "slurm", "print"], "Where the runs go.")
    app.run(main)

"""launch/: the sweep's plan (one shared data directory, one workdir per point), its links, and that every launch
script parses. A real local sweep (the README's command) takes about 2 minutes here, mostly the filter stage, so the
test checks the plan and the links; the command was run once by hand (see README, "Launching")."""
import os
import subprocess
import sys

import pytest

from lm.config import REPO

sys.path.insert(0, str(REPO / "launch"))
import sweep  # noqa: E402


def test_sweep_grid_is_the_product_of_axes_over_one_data_directory():
    plan = sweep.plan("lm.train", "configs/tiny.py", "runs/s", ["train.lr=1e-3,3e-3", "model.n_layers=2,4"],
                      overrides=["train.steps=4"])
    assert list(plan.data) == [sweep.pathlib.Path("runs/s/data")]
    data_command = plan.data[sweep.pathlib.Path("runs/s/data")]
    assert data_command[1:4] == ["-m", "lm.main", "--config=configs/tiny.py"]
    assert "--config.train.steps=4" in data_command and data_command[-2:] == [
        "--workdir=runs/s/data", "--stages=corpus,filter,tokenizer,tokenize"]
    assert len(plan.points) == 4 and all(str(d) == "runs/s/data" for _, d, _ in plan.points)
    commands = {str(point_dir): command[1:] for point_dir, _, command in plan.points}
    assert commands["runs/s/lr=3e-3_n_layers=4"] == [
        "-m", "lm.train", "--config=configs/tiny.py", "--config.train.steps=4", "--workdir=runs/s/lr=3e-3_n_layers=4",
        "--config.train.lr=3e-3", "--config.model.n_layers=4"]
    assert set(commands) == {f"runs/s/lr={lr}_n_layers={n}" for lr in ("1e-3", "3e-3") for n in (2, 4)}


def test_points_and_their_data_directories():
    plan = sweep.plan("lm.main", "configs/tiny.py", "runs/s", ["tokenizer.vocab_size=512,1024", "train.lr=1e-3,3e-3"])
    names = {str(d) for d in plan.data}
    assert names == {"runs/s/data_vocab_size=512", "runs/s/data_vocab_size=1024"}
    assert "--config.tokenizer.vocab_size=1024" in plan.data[sweep.pathlib.Path("runs/s/data_vocab_size=1024")]
    for point_dir, data_dir, command in plan.points:
        vocab = point_dir.name.removeprefix("vocab_size=").split("_")[0]
        assert data_dir.name == f"data_vocab_size={vocab}" and f"--config.tokenizer.vocab_size={vocab}" in command
        assert command[2] == "lm.main" and command[-1] == "--stages=pretrain,sample"  # data stages are shared


def test_links_into_the_data_directory(tmp_path):
    data, point = tmp_path / "data", tmp_path / "lr=1e-3"
    (data / "tokens").mkdir(parents=True)
    (data / "tokenizer").mkdir()
    (data / "tokens" / "index.json").write_text("{}")
    sweep.link_data(point, data)
    sweep.link_data(point, data)  # again: the same links are fine
    assert os.readlink(point / "tokens") == "../data/tokens" and (point / "tokens" / "index.json").exists()
    assert os.readlink(point / "tokenizer") == "../data/tokenizer"
    other = tmp_path / "other"
    (other / "tokens").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a link"):
        sweep.link_data(other, data)


def test_sweep_print_launcher_runs():
    out = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "--grid=train.lr=1e-3,2e-3"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("-m lm.train") == 2 and out.stdout.count("-m lm.main") == 1
    assert out.stdout.count("--config.train.lr=") == 2


def test_launch_scripts_parse():
    for script in ["local.sh", "multiprocess_cpu.sh", "tpu_vm.sh", "slurm.sbatch"]:
        subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)

import subprocess
import sys

from lm.config import REPO

sys.path.insert(0, str(REPO / "launch"))
import sweep  # noqa: E402


def test_sweep_grid_is_the_product_of_axes():
    commands = list(sweep.grid_commands("lm.train", "configs/tiny.py", "runs/s",
                                        ["train.lr=1e-3,3e-3", "model.n_layers=2,4"]))
    assert len(commands) == 4
    tails = {tuple(c[4:]) for c in commands}
    assert ("--workdir=runs/s/lr=3e-3_n_layers=4", "--config.train.lr=3e-3", "--config.model.n_layers=4") in tails


def test_sweep_print_launcher_runs():
    out = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), "--grid=train.lr=1e-3,2e-3"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--config.train.lr=") == 2


def test_launch_scripts_parse():
    for script in ["local.sh", "multiprocess_cpu.sh", "tpu_vm.sh", "slurm.sbatch"]:
        subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)

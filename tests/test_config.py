import os
import subprocess
import sys

import pytest

from lm import config as lm_config

SHOW_LR = ("from absl import app\nfrom lm import config\nC = config.define_config_flag()\n"
           "def main(_):\n    print(config.validate(C.value).train.lr)\napp.run(main)\n")


def test_preset_loads_and_validates():
    c = lm_config.load("configs/tiny.py")
    assert c.model.family == "gpt2"
    assert c.model.d_model == 128 and c.model.n_heads == 2
    big = lm_config.load("configs/gpt2_124m.py")
    assert (big.model.d_model, big.model.n_layers, big.model.n_heads) == (768, 12, 12)


def test_arg_variant_selects_family():
    c = lm_config.load("configs/tiny.py:llama")
    assert c.model.family == "llama"
    assert not c.model.tie_embeddings
    assert c.model.n_heads % c.model.n_kv_heads == 0


def test_overrides_are_typed():
    c = lm_config.load("configs/tiny.py", ["train.lr=1e-4", "config.train.steps=7", "model.scan_layers=true",
                                           "mesh.fsdp=2"])
    assert c.train.lr == 1e-4 and c.train.steps == 7 and c.model.scan_layers is True and c.mesh.fsdp == 2
    c = lm_config.load("configs/tiny.py", {"train.lr": 2e-4})
    assert c.train.lr == 2e-4


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1e-4", "train.lrr"),
    ("nothing.lr=1", "nothing"),
    ("train.lr=-1.0", "config.train.lr=-1.0"),
    ("train.steps=many", "config.train.steps='many'"),
    ("model.family=bert", "config.model.family='bert'"),
    ("model.n_heads=3", "n_heads=3"),
    ("train.lr", "key=value"),
])
def test_bad_override_names_key_and_value(override, words):
    with pytest.raises(lm_config.ConfigError, match=None) as error:
        lm_config.load("configs/tiny.py", [override])
    assert words in str(error.value)


def test_missing_config_file():
    with pytest.raises(lm_config.ConfigError, match="not found"):
        lm_config.load("configs/nope.py")


def test_absl_config_flag_overrides(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(SHOW_LR)
    out = subprocess.run([sys.executable, str(script), "--config=configs/tiny.py:llama", "--config.train.lr=0.125"],
                         capture_output=True, text=True, cwd=lm_config.REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.125"
    bad = subprocess.run([sys.executable, str(script), "--config.train.nope=1"],
                         capture_output=True, text=True, cwd=lm_config.REPO, timeout=120)
    assert bad.returncode != 0 and "nope" in bad.stderr


def test_unknown_key_suggests_the_closest():
    with pytest.raises(lm_config.ConfigError) as error:
        lm_config.load("configs/tiny.py", ["train.lrr=1"])
    assert str(error.value) == "unknown config key train.lrr (did you mean train.lr?)"
    with pytest.raises(lm_config.ConfigError, match=r"trian.lr \(did you mean train.lr\?\)"):
        lm_config.load("configs/tiny.py", {"trian.lr": 1.0})


def test_seq_len_longer_than_max_len_names_both_keys():
    with pytest.raises(lm_config.ConfigError, match=r"config.train.seq_len=512 > config.model.max_len=256"):
        lm_config.load("configs/tiny.py", ["train.seq_len=512"])
    assert lm_config.load("configs/tiny.py", ["train.seq_len=512", "model.max_len=512"]).train.seq_len == 512


def run_script(tmp_path, *args, cwd):
    script = tmp_path / "show.py"
    script.write_text(SHOW_LR)
    env = dict(os.environ, PYTHONPATH=str(lm_config.REPO))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--config.train.lrr=1"], "config error: unknown config key train.lrr (did you mean train.lr?)"),
    (["--config=configs/tiny.py", "--config.train.seq_len=512"],
     "config error: config.train.seq_len=512 > config.model.max_len=256: a training window must fit the model's "
     "positions"),
])
def test_command_line_config_errors_are_one_line(tmp_path, args, message):
    out = run_script(tmp_path, *args, cwd=lm_config.REPO)
    assert out.returncode != 0
    assert out.stderr.strip() == message  # the whole of stderr: no traceback, no usage text


def test_config_paths_work_from_any_directory(tmp_path):
    """configs/tiny.py from outside the repository (it is looked up there), and a config file outside the repository
    that builds on `from configs import base`."""
    own = tmp_path / "elsewhere" / "mine.py"
    own.parent.mkdir()
    own.write_text("from configs import base\n\ndef get_config(arg='0.5'):\n    c = base.get_config()\n"
                   "    c.train.lr = float(arg)\n    return c\n")
    assert lm_config.load(f"{own}:0.25").train.lr == 0.25
    out = run_script(tmp_path, "--config=configs/tiny.py:llama", "--config.train.lr=0.125", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0.125"
    out = run_script(tmp_path, "--config=elsewhere/mine.py:0.75", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0.75"

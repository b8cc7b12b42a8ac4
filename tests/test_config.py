import pytest

from lm import config as lm_config


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
    import subprocess
    import sys
    script = tmp_path / "show.py"
    script.write_text(
        "from absl import app\nfrom lm import config\nC = config.define_config_flag()\n"
        "def main(_):\n    print(config.validate(C.value).train.lr)\napp.run(main)\n")
    out = subprocess.run([sys.executable, str(script), "--config=configs/tiny.py:llama", "--config.train.lr=0.125"],
                         capture_output=True, text=True, cwd=lm_config.REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.125"
    bad = subprocess.run([sys.executable, str(script), "--config.train.nope=1"],
                         capture_output=True, text=True, cwd=lm_config.REPO, timeout=120)
    assert bad.returncode != 0 and "nope" in bad.stderr

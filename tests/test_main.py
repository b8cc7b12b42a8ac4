"""The whole pipeline on the bundled corpus, then a re-run that skips what is done and resumes what changed."""
import json
import subprocess
import sys

from lm import config as lm_config
from lm import main as lm_main

OVERRIDES = {"train.steps": 16, "train.eval_every": 8, "train.checkpoint_every": 8, "train.log_every": 4,
             "tokenizer.vocab_size": 512, "sample.max_new_tokens": 8, "sample.icl_queries": 4}


def test_pipeline_end_to_end_then_skip_and_resume(tmp_path):
    config = lm_config.load("configs/tiny.py", OVERRIDES)
    results = lm_main.run_pipeline(config, tmp_path)
    assert list(results) == [s.name for s in lm_main.STAGES]

    filtered = json.loads((tmp_path / "filter_report.json").read_text())
    dropped = sum(b["dropped"] for b in filtered["blocks"])
    assert filtered["documents_in"] == filtered["documents_kept"] + dropped
    assert filtered["documents_kept"] > 100
    assert results["tokenizer"]["n_vocab"] == 512
    pretrain = results["pretrain"]
    assert pretrain["steps"] == 16 and pretrain["val_loss"] < 7.0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert results["sample"]["samples"]
    report = (tmp_path / "report.md").read_text()
    for section in ("## filter", "## tokenizer", "## pretrain", "loss.png", "## sample", "In-context learning"):
        assert section in report

    # The CLI on the same workdir: done stages are skipped; a longer run resumes pretraining from step 16.
    out = subprocess.run([sys.executable, "-m", "lm.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                          *[f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": 20}.items()]],
                         capture_output=True, text=True, cwd=lm_config.REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("corpus", "filter", "tokenizer", "tokenize"):
        assert f"{stage}: done already" in out.stderr
    rerun = json.loads((tmp_path / "stages" / "pretrain.json").read_text())
    assert rerun["start_step"] == 16 and rerun["steps"] == 20


def test_unknown_stage_is_an_error(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="unknown stages"):
        lm_main.run_pipeline(lm_config.load("configs/tiny.py"), tmp_path, only=["nope"])

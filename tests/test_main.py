"""The whole seed on the bundled corpus, every stage scaled down by config, then a re-run that skips what is done and
resumes what changed."""
import json
import subprocess
import sys

from lm import config as lm_config
from lm import main as lm_main

OVERRIDES = {"train.steps": 16, "train.eval_every": 8, "train.checkpoint_every": 8, "train.log_every": 4,
             "tokenizer.vocab_size": 512, "sample.max_new_tokens": 8, "sample.icl_queries": 4}
# Every post-training stage for a few steps (8 test devices: batches are multiples of 8).
TINY = ("train.log_every=1", "train.warmup_steps=0")
POSTTRAIN = {
    "posttrain.overrides.sft": TINY + (
        "train.steps=6", "train.eval_every=0", "train.checkpoint_every=6", "sft.eval_examples=4",
        "sft.train_eval_examples=0", "sft.pass_k_samples=2", "sft.eval_max_new_tokens=8", "sft.shown=1"),
    "posttrain.overrides.reward": TINY + (
        "train.steps=4", "train.eval_every=0", "train.checkpoint_every=4", "reward.synthetic_pairs=64"),
    "posttrain.overrides.dpo": TINY + (
        "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "dpo.synthetic_pairs=64"),
    "posttrain.overrides.ppo": TINY + (
        "train.steps=4", "train.checkpoint_every=4", "train.batch_size=8", "ppo.rollout_batch=16", "ppo.n_prompts=32",
        "ppo.max_new_tokens=8"),
    "posttrain.overrides.hacking": TINY + (
        "train.steps=4", "train.checkpoint_every=4", "train.batch_size=8", "ppo.rollout_batch=16", "ppo.n_prompts=32",
        "ppo.max_new_tokens=8", "hacking.seeds=(0,)", "hacking.pairs=(16, 32)", "hacking.kl_coefs=(0.02, 0.2)",
        "hacking.rollouts=2", "hacking.bon_n=(1, 2)", "hacking.bon_prompts=8", "hacking.eval_pairs=16", "hacking.proxy_steps=4",
        "hacking.proxy_batch=8"),
    "posttrain.overrides.grpo": TINY + (
        "train.steps=2", "train.eval_every=0", "train.checkpoint_every=2", "grpo.prompts=4", "grpo.group_size=4",
        "grpo.max_new_tokens=8", "grpo.eval_problems=8", "grpo.eval_samples=2", "grpo.eval_ks=(1, 2)"),
}
DATA_STAGES = ("corpus", "filter", "tokenizer", "tokenize", "pretrain")


def test_pipeline_end_to_end_then_skip_and_resume(tmp_path):
    config = lm_config.load("configs/tiny.py", {**OVERRIDES, **POSTTRAIN})
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
    for section in ("## filter", "## tokenizer", "## pretrain", "loss.png", "## sample", "In-context learning",
                    "## sft", "## reward", "## dpo", "## ppo", "## hacking", "hacking/hacking.png", "## grpo"):
        assert section in report
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= 2 and 'src="loss.png"' not in page
    for run_dir, name in (("sft", "sft_report.json"), ("reward", "reward_report.json"), ("dpo", "dpo_report.json"),
                          ("ppo", "ppo_report.json"), ("hacking", "hacking_report.json"), ("grpo", "grpo_report.json")):
        assert (tmp_path / run_dir / name).exists(), name

    # The CLI on the same workdir: done stages are skipped; a longer run resumes pretraining from step 16.
    out = subprocess.run([sys.executable, "-m", "lm.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                          f"--stages={','.join(DATA_STAGES)}",
                          *[f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": 20}.items()]],
                         capture_output=True, text=True, cwd=lm_config.REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("corpus", "filter", "tokenizer", "tokenize"):
        assert f"{stage}: done already" in out.stderr
    rerun = json.loads((tmp_path / "stages" / "pretrain.json").read_text())
    assert rerun["start_step"] == 16 and rerun["steps"] == 20


def test_a_stage_whose_inputs_are_missing_names_the_stage_to_run_first(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError, match="which stage 'sft' writes"):
        lm_main.run_pipeline(lm_config.load("configs/tiny.py"), tmp_path, only=["grpo"])


def test_unknown_stage_is_an_error(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="unknown stages"):
        lm_main.run_pipeline(lm_config.load("configs/tiny.py"), tmp_path, only=["nope"])

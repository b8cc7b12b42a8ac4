"""lm.report's GRPO section on the files a real tiny GRPO run wrote (a random model, the easy has-digit reward, three
evaluations with pass@1..8): the pass@k curve's points are the run's own eval records, the PNG is written into the
workdir and embedded (and inlined in report.html), the table is the report's before / after, and one full completion
with its thinking is shown."""
import json

import pytest

from lm import config as lm_config
from lm import report
from lm.eval import tiny_runs
from lm.train import grpo, metrics

KS = (1, 2, 4, 8)
OVERRIDES = {
    "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 64,
    "model.max_len": 48, "grpo.prompts": 4, "grpo.group_size": 8, "grpo.prompt_len": 32, "grpo.max_new_tokens": 6,
    "grpo.minibatches": 1, "grpo.train_problems": 64, "grpo.eval_problems": 8, "grpo.eval_samples": 8,
    "grpo.eval_ks": KS, "train.seq_len": 37, "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
    "train.lr": 1e-2, "mesh.data": 8}


@pytest.fixture(scope="module")
def grpo_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    tok = tiny_runs.arithmetic_tokenizer(300)
    config = lm_config.load("configs/grpo_tiny.py", {**OVERRIDES, "model.vocab_size": tok.n_vocab})
    tiny_runs.random_run(workdir / "sft", config, tok)
    summary = grpo.run(config, workdir, task=tiny_runs.HasDigit())
    return workdir, summary, json.loads((workdir / "grpo" / grpo.REPORT).read_text())


def test_pass_at_k_curve_is_the_runs_eval_records(grpo_workdir):
    workdir, _, written = grpo_workdir
    evals = {r["step"]: r for r in metrics.read_metrics(workdir / "grpo" / "metrics.jsonl") if "eval/pass@1" in r}
    assert sorted(evals) == [2, 4]
    series = report.pass_at_k_series(written["curve"])
    assert list(series) == ["greedy pass@1", *[f"sampled pass@{k}" for k in KS]]
    assert series["greedy pass@1"] == [(0, written["before"]["greedy_pass@1"]),
                                       *[(s, evals[s]["eval/greedy_pass@1"]) for s in (2, 4)]]
    for k in KS:
        assert series[f"sampled pass@{k}"] == [(0, written["before"][f"pass@{k}"]),
                                               *[(s, evals[s][f"eval/pass@{k}"]) for s in (2, 4)]]
    for step in range(3):  # the unbiased estimator on the same samples: pass@k does not fall as k grows
        values = [series[f"sampled pass@{k}"][step][1] for k in KS]
        assert values == sorted(values) and 0 <= values[0] and values[-1] <= 1
    assert max(v for _, v in series["sampled pass@8"]) > 0  # the easy reward is earned: the curve is not all zeros


def test_report_embeds_the_plot_and_one_completion_with_its_thinking(grpo_workdir):
    workdir, summary, written = grpo_workdir
    text = report.render(workdir, {"grpo": summary})
    assert f"![greedy pass@1 and sampled pass@k over GRPO steps]({report.GRPO_PLOT})" in text
    png = (workdir / report.GRPO_PLOT).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    before, after = written["before"], written["after"]
    assert f"| pass@8 | {before['pass@8']:.4g} | {after['pass@8']:.4g} |" in text
    assert f"greedy pass@1 {before['greedy_pass@1']:.3g} → {after['greedy_pass@1']:.3g}" in text  # the headline
    shown = next((s for s in written["after_shown"] if s["thinking"]), written["after_shown"][0])
    assert f"prompt:   {shown['prompt']}\nthinking: {shown['thinking']}\nanswer:   {shown['answer']}" in text
    page = report.render_html(workdir, text)
    assert page.count("data:image/png;base64,") == 1 and f'src="{report.GRPO_PLOT}"' not in page

"""SFT through the one loop, on a tiny model pretrained here for a few steps (a 512-token BPE on CPython's docs):
held-out assistant loss falls and the identity task's exact match rises; the loss mask is exactly the assistant's
tokens (checked against render_conversation), one conversation per row read from the run's token + loss-mask shards
by the pipeline; init_from loads the pretrained weights; a killed run resumes bit for bit from the shards it saved;
padding is never an end-of-turn id; a real conversation file trains."""
import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import tokenizer as lm_tokenizer
from lm.data import pipeline, tokenize
from lm.eval import tasks
from lm.tokenizer import chat
from lm.train import loop, metrics, pretrain, sft
from tests.conftest import shared_path
from tests.test_chat_template import bpe_tokenizer

pytestmark = pytest.mark.usefixtures("compilation_cache")   # tests/conftest.py: one XLA cache for the module's runs
MODEL = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 256,
         "model.max_len": 160, "mesh.data": 8}
EASY = dict(identity=dict(n=400), arithmetic=dict(n=400, n_operands=2, digits=1, ops="+"))


def sft_config(tasks_=EASY, inputs=(), **overrides):
    values = {**MODEL, "train.steps": 120, "train.batch_size": 16, "train.lr": 1e-2, "train.warmup_steps": 5,
              "train.eval_every": 60, "train.checkpoint_every": 60, "train.log_every": 20, "sft.eval_examples": 16,
              "sft.train_eval_examples": 16, "sft.eval_max_new_tokens": 40, "sft.pass_k_samples": 4,
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    config = lm_config.load("configs/sft_tiny.py", values)
    config.sft.tasks = ml_collections.ConfigDict(tasks_)
    config.sft.inputs = tuple(inputs)
    config.sft.pass_k_tasks = tuple(t for t in config.sft.pass_k_tasks if t in tasks_)
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp("pipeline"))


def make_pipeline(workdir):
    """A pipeline workdir: tokenizer/ (test_chat_template's 1024-token BPE on CPython's docs), tokens/ and
    checkpoints/ of 10 pretraining steps on those docs."""
    from pydoc_data.topics import topics
    texts = [text for _, text in sorted(topics.items())[:150]]
    (workdir / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = bpe_tokenizer()
    tokenizer.save(workdir / "tokenizer", hf=False)
    tokenize.run(tokenizer, [str(workdir / "docs.jsonl")], workdir / "tokens", dict(val_fraction=0.1))
    config = lm_config.load("configs/tiny.py", {**MODEL, "train.steps": 10, "train.seq_len": 64,
                                                "train.batch_size": 16, "train.eval_every": 0,
                                                "train.checkpoint_every": 10})
    pretrain.run(config, workdir)
    return workdir


def link_pipeline(pretrained, workdir):
    """A new workdir sharing the pretrained run's tokenizer and checkpoints."""
    workdir.mkdir()
    for name in ("tokenizer", "checkpoints"):
        (workdir / name).symlink_to(pretrained / name)
    return workdir


def train_windows(workdir) -> pipeline.Windows:
    """The SFT run's train split as the pipeline reads it: one conversation per row (document packing)."""
    data = pipeline.TokenData(workdir / "sft" / "data", "train")
    return pipeline.Windows(data, data.index["seq_len"], packing="document")


@pytest.fixture(scope="module")
def trained(pretrained):
    summary = sft.run(sft_config(), pretrained)
    report = json.loads((pretrained / "sft" / sft.REPORT).read_text())
    return pretrained, summary, report


def test_sft_lowers_held_out_loss_and_raises_exact_match(trained):
    workdir, summary, report = trained
    before, after = report["before"], report["after"]
    assert after["assistant_loss"]["all"] < before["assistant_loss"]["all"] - 2.0
    for name in EASY:
        assert after["assistant_loss"][name] < before["assistant_loss"][name]
    assert before["tasks"]["identity"]["exact_match"] < 0.2
    assert after["tasks"]["identity"]["exact_match"] >= before["tasks"]["identity"]["exact_match"] + 0.5
    assert after["tasks"]["identity"]["ended"] > 0.9 and before["tasks"]["identity"]["ended"] < 0.2
    assert report["headline"]["assistant_loss"] == [before["assistant_loss"]["all"], after["assistant_loss"]["all"]]
    assert set(after["pass_at_k"]["arithmetic"]) >= {"pass@1", "pass@4"}
    shown = after["tasks"]["identity"]["shown"][0]
    assert {"prompt", "reference", "thinking", "answer", "reward"} <= set(shown)
    assert summary["steps"] == 120 and summary["report"].endswith(sft.REPORT)
    # its own run directory: checkpoints, metrics, TensorBoard, the data shards; the pretrained run is untouched
    run_dir = workdir / "sft"
    assert lm_checkpoint.find_checkpoints(run_dir) == run_dir / "checkpoints"
    assert (run_dir / "tb").is_dir() and tokenize.read_index(run_dir / "data")["loss_mask"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [10]
    lines = metrics.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 121))
    assert [r["step"] for r in lines if "heldout/identity_exact_match" in r] == [60, 120]
    assert lines[-1]["val_loss"] == pytest.approx(after["assistant_loss"]["all"], rel=1e-4)


def test_tokens_are_the_supervised_tokens_of_each_batch(trained):
    workdir, _, _ = trained
    windows = train_windows(workdir)
    lines = metrics.read_metrics(workdir / "sft" / "metrics.jsonl")
    for step in (1, 77):
        batch = pipeline.train_batch(windows, step - 1, 16, seed=0)
        assert lines[step - 1]["tokens"] == batch["loss_mask"].sum() < batch["loss_mask"].size
        np.testing.assert_allclose(lines[step - 1]["all_tokens_per_sec"] / lines[step - 1]["tokens_per_sec"],
                                   batch["loss_mask"].size / batch["loss_mask"].sum(), rtol=1e-6)


def test_loss_mask_covers_exactly_the_assistant_tokens(trained):
    """Each row of a batch, matched by its ids to the task example it renders: the supervised targets are the
    assistant's tokens of render_conversation (thinking, answer, end token), the rest of the row is unsupervised."""
    workdir, _, report = trained
    tok = lm_tokenizer.load(workdir / "tokenizer")
    windows = train_windows(workdir)
    examples = tasks.Identity().examples("train", 400, seed=0) + tasks.Arithmetic(2, 1, "+").examples("train", 400,
                                                                                                       seed=0)
    assert windows.n == len(examples) == report["data"]["rows"]["train"]["rows"]   # none dropped
    by_ids = {tuple(chat.render_conversation(tok, e.conversation)[0]): e for e in examples}
    batch = pipeline.train_batch(windows, 5, 16, seed=0)
    pad = chat.pad_id(tok)
    for row in range(16):
        real = np.append(batch["inputs"][row], batch["targets"][row, -1])
        example = by_ids[tuple(real[real != pad].tolist())]   # (no task conversation is cut at this seq_len)
        ids, mask = chat.render_conversation(tok, example.conversation)
        want = [i for i, m in zip(ids, mask) if m]
        got = batch["targets"][row][batch["loss_mask"][row] == 1].tolist()
        assert got == want
        assert want == chat.render_answer(tok, example.answer, example.thinking)   # the assistant turn only
        assert tok.decode(want[:-1]).endswith(example.answer) and want[-1] == tok.token_id(chat.ASSISTANT_END)
        n = len(ids)
        assert real[:n].tolist() == ids and (real[n:] == pad).all()                 # the whole conversation, padded
        assert batch["loss_mask"][row, n - 1:].sum() == 0                         # and padding is never learnt


def test_pad_is_never_an_end_of_turn_id(trained):
    workdir, _, _ = trained
    tok = lm_tokenizer.load(workdir / "tokenizer")
    pad = chat.pad_id(tok)
    ends = {tok.token_id(t) for t in (chat.ASSISTANT_END, chat.USER_END, chat.SYSTEM_END, chat.BEGIN)}
    assert pad not in ends
    windows = train_windows(workdir)
    assert windows.pad_id == windows.data.index["pad_id"] == pad
    batch = pipeline.train_batch(windows, 0, 16, seed=0)
    assert (batch["targets"][batch["loss_mask"] == 1] != pad).all()
    assert (batch["targets"] == pad).any() and (batch["loss_mask"][batch["targets"] == pad] == 0).all()
    # every row teaches its end token exactly as often as it has assistant turns
    assert ((batch["targets"] == tok.token_id(chat.ASSISTANT_END)) * batch["loss_mask"]).sum(1).min() == 1


def test_init_from_loads_the_pretrained_weights(trained, tmp_path):
    workdir, _, report = trained
    pretrained_model, _, _ = lm_checkpoint.load_model(workdir)
    want = nnx.to_pure_dict(nnx.state(pretrained_model, nnx.Param))
    config = pretrain.resolve_vocab(sft_config(), 1024)
    tok = lm_tokenizer.load(workdir / "tokenizer")
    data = sft.prepare_data(config, tok, sft.make_tasks(config.sft), workdir / "sft")
    objective = sft.objective(config, data, tok, workdir / "tokenizer", sft.make_tasks(config.sft), workdir)
    with loop.Trainer(config, tmp_path / "fresh", objective) as trainer:
        got = nnx.to_pure_dict(nnx.state(trainer.current_model(), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    fresh = nnx.to_pure_dict(nnx.state(objective.make_model(), nnx.Param))
    assert not np.array_equal(fresh["embed"], want["embed"])
    _, _, meta = lm_checkpoint.load_model(workdir / "sft")
    assert meta["objective"] == "sft" and meta["init_from"]["step"] == 10
    assert meta["init_from"]["objective"] == "pretrain" and report["before"]["objective"] == "pretrain"


SHORT = dict(train__steps=6, train__eval_every=3, train__checkpoint_every=2)   # evals as above: compiled once
SMALL = dict(identity=dict(n=40), arithmetic=dict(n=40, n_operands=2, digits=1, ops="+"))


def test_resume_is_bit_exact_and_reads_the_saved_shards(pretrained, tmp_path):
    straight = link_pipeline(pretrained, tmp_path / "straight")
    sft.run(sft_config(SMALL, **SHORT), straight)
    resumed = link_pipeline(pretrained, tmp_path / "resumed")
    partial = sft.run(sft_config(SMALL, **SHORT), resumed, stop_after=3)
    assert partial["steps"] == 3 and not (resumed / "sft" / sft.REPORT).exists()
    written = (resumed / "sft" / "data" / tokenize.INDEX_FILE).stat().st_mtime_ns
    with pytest.raises(ValueError, match="another data config"):   # the data it trained on must stay
        sft.run(sft_config(dict(SMALL, identity=dict(n=41)), **SHORT), resumed)
    summary = sft.run(sft_config(SMALL, **SHORT), resumed)
    assert summary["start_step"] == 2
    assert (resumed / "sft" / "data" / tokenize.INDEX_FILE).stat().st_mtime_ns == written   # read, not rebuilt
    timing = ("tokens_per_sec", "all_tokens_per_sec", "mfu")
    def curve(workdir):
        return [{k: v for k, v in r.items() if k not in timing}
                for r in metrics.read_metrics(workdir / "sft" / "metrics.jsonl")]
    assert curve(resumed) == curve(straight)
    got, _, _ = lm_checkpoint.load_model(resumed / "sft")
    want, _, _ = lm_checkpoint.load_model(straight / "sft")
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(got, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(want, nnx.Param)))
    files = sorted(p.relative_to(straight) for p in (straight / "sft" / "data").rglob("*") if p.is_file())
    assert {p.parent.name for p in files} == {"data", "train", "identity", "arithmetic"}
    assert files == sorted(p.relative_to(resumed) for p in (resumed / "sft" / "data").rglob("*") if p.is_file())
    for name in files:
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name


def test_a_real_conversation_file_trains(pretrained, tmp_path):
    path = shared_path("posttrain/sft/nanochat_identity_conversations.jsonl")
    workdir = link_pipeline(pretrained, tmp_path / "files")
    config = sft_config({}, inputs=[str(path)], **dict(SHORT, train__steps=3))
    summary = sft.run(config, workdir)
    report = json.loads((workdir / "sft" / sft.REPORT).read_text())
    sources = report["data"]["sources"]["files"]
    assert sources["train"] + sources["held_out"] == 1000 and 0 < sources["held_out"] < 150
    assert report["data"]["files"]["kept"] == 1000 and report["data"]["files"]["rejected"] == 0
    rows = report["data"]["rows"]["train"]
    assert rows["rows"] == sources["train"] and rows["truncated"] > 0   # long ones are cut, and counted
    assert np.isfinite(summary["train_loss"]) and summary["steps"] == 3
    assert set(report["after"]["assistant_loss"]) == {"all", "files"} and report["after"]["tasks"] == {}

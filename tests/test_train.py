"""lm.train on real text (FineWeb documents, our own 512-token BPE) with a tiny model on 8 virtual CPU devices:
the loss falls, meshes agree, a killed run resumes bit for bit (also onto another mesh), gradient accumulation
equals the large batch, a NaN stops the run naming the step, and the CLI continues to a new total."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config as lm_config
from lm import mesh as lm_mesh
from lm.data import pipeline, tokenize
from lm.model import Transformer
from lm.train import loop, metrics, optim, pretrain
from lm.train import state as lm_state
from tests.conftest import REPO, new_workdir

OVERRIDES = {
    "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 256, "model.max_len": 64,
    "model.dtype": "float32", "train.seq_len": 32, "train.batch_size": 16, "train.lr": 1e-2,
    "train.warmup_steps": 3, "train.log_every": 10, "train.eval_every": 10, "train.eval_batches": 4,
    "train.checkpoint_every": 5, "train.keep_checkpoints": 2,
}
STEPS = 30
pytestmark = pytest.mark.usefixtures("compilation_cache")   # tokens_dir: 300 documents, 512 tokens


def make_config(steps=STEPS, mesh=(8, 1, 1), **overrides):
    values = {**OVERRIDES, "train.steps": steps, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    return lm_config.load("configs/tiny.py", values)


def curve(workdir, keys=("loss", "grad_norm", "lr", "val_loss")):
    return [{k: r[k] for k in ("step", *keys) if k in r} for r in metrics.read_metrics(workdir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokens_dir):
    """30 uninterrupted steps on the data-parallel mesh, under a transfer guard: the loop moves data between host
    and devices only explicitly."""
    workdir = new_workdir(tmp_path_factory.mktemp("straight"), tokens_dir, "run")
    with jax.transfer_guard("disallow"):
        summary = pretrain.run(make_config(), workdir)
    return workdir, summary


def unigram_entropy(tokens_dir):
    index = tokenize.read_index(tokens_dir)
    tokens = np.concatenate([np.fromfile(tokens_dir / s["tokens_file"], index["dtype"])
                             for s in index["splits"]["train"]["shards"]])
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_loss_decreases(straight_run, tokens_dir):
    workdir, summary = straight_run
    records = metrics.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    losses = [r["loss"] for r in records]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert np.mean(losses[-5:]) < losses[0] - 0.7 and val[-1] < val[0], (losses, val)
    assert losses[0] > unigram_entropy(tokens_dir) + 0.5  # the untrained model is worse than token frequencies
    assert summary["steps"] == STEPS and summary["train_loss"] == records[-1]["loss"]
    assert 0 < summary["mfu"] < 1.5 and summary["tokens_per_sec"] > 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [25, 30]  # keep_checkpoints=2
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    png = metrics.plot_losses(workdir / "metrics.jsonl", workdir / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_lr_schedule_matches_formula():
    train = make_config(steps=100, train__warmup_steps=10, train__min_lr_ratio=0.1).train
    schedule = optim.learning_rate(train)
    peak = train.lr
    for step in (0, 5, 9):
        assert np.isclose(schedule(step), peak * (step + 1) / 10)
    for step in (10, 40, 99, 100, 150):
        t = min((step - 10) / 90, 1.0)
        assert np.isclose(schedule(step), 0.1 * peak + 0.9 * peak * 0.5 * (1 + np.cos(np.pi * t)), rtol=1e-6)
    linear = optim.learning_rate(make_config(steps=100, train__warmup_steps=0, train__schedule="linear").train)
    assert np.isclose(linear(50), peak * (1 - 0.9 * 50 / 100), rtol=1e-6)


def test_weight_decay_mask_skips_norms_biases_embeddings():
    config = make_config()
    config.model.vocab_size = 512
    _, params, _ = lm_state.split_params(nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
    flat = {jax.tree_util.keystr(path): decays for path, decays in
            jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]}
    assert flat and all(not decays for path, decays in flat.items() if "embed" in path)
    assert all(not decays for path, decays in flat.items() if "norm" in path or "bias" in path)
    decayed = sorted(path.split("]['")[-1].split("'")[0] for path, decays in flat.items() if decays)
    assert decayed == sorted(["q", "k", "v", "o", "up", "down"] * 2)  # the matrices of 2 blocks


def test_meshes_agree(straight_run, tmp_path, tokens_dir):
    """The first 5 losses of data-parallel, FSDP and tensor-parallel (with 2 accumulated micro batches) meshes
    agree to float tolerance."""
    reference = [r["loss"] for r in curve(straight_run[0])[:5]]
    for mesh, accum in (((1, 8, 1), 1), ((2, 1, 4), 2)):
        workdir = new_workdir(tmp_path, tokens_dir, "mesh_" + "x".join(map(str, mesh)))
        pretrain.run(make_config(mesh=mesh, train__eval_every=0, train__grad_accum=accum), workdir, stop_after=5)
        np.testing.assert_allclose([r["loss"] for r in curve(workdir)], reference, rtol=2e-5, err_msg=str(mesh))


def test_state_is_sharded_like_params():
    """On a 2 x 2 x 2 mesh the embedding is split over tensor (vocab) and fsdp (embed); Adam's mu and nu follow."""
    mesh = lm_mesh.make_mesh(dict(data=2, fsdp=2, tensor=2))
    config = pretrain.resolve_vocab(make_config(), 512)
    with jax.set_mesh(mesh):
        spec = lm_state.build_spec(lambda: Transformer(config.model, rngs=nnx.Rngs(0)),
                                   optim.make_optimizer(config.train), mesh)
    def only(tree):
        (leaf,) = jax.tree.leaves(tree)
        return leaf

    embed = only(spec.shardings["params"]["embed"])
    assert embed.spec == jax.P("tensor", "fsdp")
    adam = spec.shardings["opt_state"][1][0]  # chain(clip, adamw); adamw = chain(scale_by_adam, ...)
    assert only(adam.mu["embed"]) == embed and only(adam.nu["embed"]) == embed
    assert adam.count.spec == jax.P() and spec.shardings["step"].spec == jax.P()
    assert only(spec.abstract["params"]["embed"]).sharding == embed


def test_kill_and_resume_is_bit_exact(straight_run, tmp_path, tokens_dir):
    """Killed after step 17 (last checkpoint 15), then the same command again: the curve equals the straight run's."""
    workdir = new_workdir(tmp_path, tokens_dir, "killed")
    pretrain.run(make_config(), workdir, stop_after=17)
    assert [r["step"] for r in curve(workdir)] == list(range(1, 18))
    summary = pretrain.run(make_config(), workdir)
    assert summary["start_step"] == 15 and summary["steps"] == STEPS
    assert curve(workdir) == curve(straight_run[0])  # every float equal, val losses included


def test_resume_onto_another_mesh(straight_run, tmp_path, tokens_dir):
    """The straight run's step-25 checkpoint (8-way data parallel) continues on a 2 data x 4 tensor mesh."""
    workdir = new_workdir(tmp_path, tokens_dir, "other_mesh")
    shutil.copytree(straight_run[0] / "checkpoints" / "25", workdir / "checkpoints" / "25")
    summary = pretrain.run(make_config(mesh=(2, 1, 4), train__eval_every=0, train__grad_accum=2), workdir)
    assert summary["start_step"] == 25
    expected = [r["loss"] for r in curve(straight_run[0])[25:]]
    np.testing.assert_allclose([r["loss"] for r in curve(workdir)], expected, rtol=2e-5)


def test_grad_accumulation_equals_large_batch(tokens_dir):
    """Gradients summed over 4 micro batches equal the whole batch's, the loss equals a numpy cross-entropy of the
    model's logits, and the sharded init (FSDP mesh) shards Adam's state like the parameters."""
    config = pretrain.resolve_vocab(make_config(mesh=(1, 8, 1), train__eval_every=0), 512)
    objective = pretrain.objective(config, tokens_dir)
    mesh = lm_mesh.make_mesh(config.mesh)
    batch = next(pipeline.train_batches(tokens_dir, 32, 16, 0, process_index=0, process_count=1))
    with jax.set_mesh(mesh):
        tx = optim.make_optimizer(config.train)
        spec = lm_state.build_spec(objective.make_model, tx, mesh)
        state = lm_state.init_state(objective.make_model, tx, spec)
        loss_sum_and_grad = loop.make_loss_sum_and_grad(objective, spec)

        @jax.jit
        def whole_and_accumulated(params, batch):
            return [optim.accumulate_gradients(loss_sum_and_grad, params, batch, n,
                                               lambda ndim: lm_mesh.batch_sharding(mesh, ndim)) for n in (1, 4)]

        whole, accumulated = jax.device_get(whole_and_accumulated(state["params"], loop.global_batch(batch, mesh)))
    embed = state["params"]["embed"][...]
    assert embed.sharding.spec == jax.P(None, "fsdp")
    assert state["opt_state"][1][0].mu["embed"][...].sharding == embed.sharding
    (loss_sum, weight, _), grads = whole
    (loss_sum4, weight4, _), grads4 = accumulated
    assert weight == weight4 == 16 * 32
    np.testing.assert_allclose(loss_sum4, loss_sum, rtol=1e-6)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))  # float32 sums over 512 tokens, reordered
    for a, b in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
    model = spec.merge(jax.device_get(state["params"]))
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(batch["inputs"])), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(loss_sum / weight, nll.mean(), rtol=1e-5)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, tokens_dir):
    config = pretrain.resolve_vocab(make_config(train__eval_every=0), 512)
    objective = pretrain.objective(config, tokens_dir)
    clean = objective.train_batches

    def poisoned(start_step):
        for step, batch in enumerate(clean(start_step), start_step):
            if step == 2:  # the batch of the third step
                batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
            yield batch

    objective.train_batches = poisoned
    with pytest.raises(FloatingPointError, match="at step 3"):
        loop.train(config, tmp_path, objective)


def test_micro_batch_that_does_not_split_is_a_config_error(tmp_path, tokens_dir):
    workdir = new_workdir(tmp_path, tokens_dir, "bad_split")
    with pytest.raises(lm_config.ConfigError, match="grad_accum=4 = 4 rows per micro batch"):
        pretrain.run(make_config(train__grad_accum=4), workdir)


def test_cli_continues_to_the_new_total(straight_run, tmp_path, compilation_cache):
    """`python -m lm.train` on a finished 30-step workdir with --config.train.steps=32 trains steps 31 and 32."""
    workdir = tmp_path / "cli"
    shutil.copytree(straight_run[0], workdir, symlinks=True)
    overrides = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": 32, "train.eval_every": 0}.items()]
    env = dict(os.environ, **compilation_cache, PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-m", "lm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                             *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["start_step"] == 30 and summary["steps"] == 32
    assert [r["step"] for r in curve(workdir)] == list(range(1, 33))
    assert "step 32/32" in result.stderr


def test_two_processes_train_like_one(straight_run, tmp_path, tokens_dir, compilation_cache):
    """launch/multiprocess_cpu.sh: 2 processes x 4 CPU devices (jax.distributed on localhost), each feeding its half
    of every batch, give the single-process loss curve."""
    workdir = new_workdir(tmp_path, tokens_dir, "two_processes")
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [f"--config.train.steps={STEPS}"]
    env = dict(os.environ, **compilation_cache, PYTHONPATH=str(REPO), NPROC="2", DEVICES="4")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(["bash", str(REPO / "launch" / "multiprocess_cpu.sh"), "lm.train",
                             "--config=configs/tiny.py", f"--workdir={workdir}", *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "[p1]" in result.stdout and f"step {STEPS}/{STEPS}" in result.stdout
    two, one = curve(workdir), curve(straight_run[0])
    assert [r["step"] for r in two] == [r["step"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)


def test_empty_val_split_trains_without_eval(tmp_path, tokens_dir):
    """Tokens written with val_fraction=0: the run trains and checkpoints with no val_loss instead of crashing."""
    from lm import tokenizer as lm_tokenizer
    tokenizer = lm_tokenizer.load(tokens_dir.parent / "tokenizer")
    workdir = tmp_path / "no_val"
    tokenize.run(tokenizer, [str(tokens_dir.parent / "docs.jsonl.gz")], workdir / "tokens", dict(val_fraction=0.0))
    summary = pretrain.run(make_config(steps=2), workdir)
    assert summary["steps"] == 2 and summary["val_loss"] is None
    assert not any("val_loss" in r for r in curve(workdir))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2]

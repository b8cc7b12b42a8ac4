"""The Trainer with objectives that are not pretraining (a masked loss on an on-policy synthetic batch source; a
scalar-head regression started from another run): bit-exact resume, live parameters for the batch source, init_from
(values, fresh heads, shape and missing-parameter errors, meta, resume wins), per-batch metrics and extra evals in
metrics.jsonl, tokens counted from loss_mask, the final checkpoint saved before a failing final eval, and an empty
eval split skipped."""
import os
import resource
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import mesh as lm_mesh
from lm.model import Transformer, TransformerWithScalarHead
from lm.train import loop, losses, metrics

VOCAB, B, T, STEPS = 64, 8, 8, 6
OVERRIDES = {"model.vocab_size": VOCAB, "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 4,
             "model.n_kv_heads": 4, "model.d_ff": 64, "model.max_len": 16, "model.dtype": "float32",
             "train.seq_len": T, "train.batch_size": B, "train.steps": STEPS, "train.lr": 1e-2,
             "train.warmup_steps": 1, "train.eval_every": 3, "train.checkpoint_every": 2, "train.log_every": 1,
             "train.keep_checkpoints": 5, "mesh.data": 8}


def make_config(**overrides):
    return lm_config.load("configs/tiny.py", {**OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}})


def toy_batch(step):
    """Step `step`'s batch: learn to predict token + 1; rows of random lengths (the rest padding, mask 0)."""
    rng = np.random.default_rng(step)
    inputs = rng.integers(0, VOCAB, (B, T), dtype=np.int32)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return dict(inputs=inputs, targets=(inputs + 1) % VOCAB, loss_mask=mask)


def masked_loss(model, batch):
    loss_sum, weight, _ = losses.lm_loss(model, batch)
    correct = (jnp.argmax(model(batch["inputs"]), -1) == batch["targets"]) * batch["loss_mask"]
    return loss_sum, weight, {"accuracy": jnp.sum(correct)}


@nnx.jit
def mean_nll(model, inputs, targets):
    return -jnp.mean(losses.sequence_token_logprobs(model, inputs, targets))


def toy_objective(config, seen=None, **fields):
    """On-policy: every batch is scored by the live model before it is trained on (as a rollout's reward would be),
    and that number and the live embedding's sum travel with the batch as its metrics."""
    def train_batches(start_step, current_model):
        for index in range(start_step, 10 ** 6):
            batch = toy_batch(index)
            model = current_model()
            live = dict(live_nll=float(mean_nll(model, batch["inputs"], batch["targets"])),
                        live_embed_sum=float(jnp.sum(model.embed[...])))
            if seen is not None:
                seen[index + 1] = live
            yield dict(batch, metrics=live)

    return loop.Objective(
        loss=masked_loss, train_batches=train_batches, on_policy=True,
        make_model=lambda: Transformer(config.model, rngs=nnx.Rngs(0)),
        eval_batches=lambda: [toy_batch(1000 + i) for i in range(2)],
        evals={"probe": lambda model: {"embed_abs_mean": jnp.mean(jnp.abs(model.embed[...]))}},
        meta=dict(objective="toy"), **fields)


def records(workdir):
    return metrics.read_metrics(workdir / "metrics.jsonl")


def params_of(run, step=None):
    model, _, meta = lm_checkpoint.load_model(run, step=step)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), meta


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    seen = {}
    summary = loop.train(make_config(), workdir, toy_objective(make_config(), seen))
    return workdir, seen, summary


def test_metrics_tokens_evals_and_live_params(straight):
    workdir, seen, summary = straight
    lines = records(workdir)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)) and summary["steps"] == STEPS
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.2  # it learns
    for r in lines:
        mask = toy_batch(r["step"] - 1)["loss_mask"]
        assert r["tokens"] == mask.sum() < mask.size  # scored tokens, not the padded shape
        np.testing.assert_allclose(r["all_tokens_per_sec"] / r["tokens_per_sec"], mask.size / mask.sum(), rtol=1e-6)
        assert r["live_nll"] == seen[r["step"]]["live_nll"]  # the batch's own metrics, in metrics.jsonl
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]
    assert [r["step"] for r in lines if "probe/embed_abs_mean" in r] == [3, 6]
    assert all(0 <= r["val_accuracy"] <= 1 for r in lines if "val_loss" in r)
    # The batch of step s was made with the parameters after step s - 1: those saved in checkpoint s - 1.
    for step in (3, 5):
        params, _ = params_of(workdir, step - 1)
        assert seen[step]["live_embed_sum"] == pytest.approx(float(np.sum(params["embed"])), rel=1e-6)
    assert seen[1]["live_embed_sum"] != seen[3]["live_embed_sum"]
    final, meta = params_of(workdir)
    assert meta["step"] == STEPS and meta["objective"] == "toy" and meta["model_kind"] == "transformer"
    probe = float(np.mean(np.abs(final["embed"])))
    assert lines[-1]["probe/embed_abs_mean"] == pytest.approx(probe, rel=1e-6)


def test_resume_is_bit_exact(straight, tmp_path):
    """Killed after step 3 (last checkpoint 2), then run again: every metric and the final parameters equal the
    uninterrupted run's."""
    workdir = tmp_path / "resumed"
    loop.train(make_config(), workdir, toy_objective(make_config()), stop_after=3)
    assert [r["step"] for r in records(workdir)] == [1, 2, 3]
    summary = loop.train(make_config(), workdir, toy_objective(make_config()))
    assert summary["start_step"] == 2
    drop = ("tokens_per_sec", "all_tokens_per_sec", "mfu")
    assert [{k: v for k, v in r.items() if k not in drop} for r in records(workdir)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in records(straight[0])]
    got, want = params_of(workdir)[0], params_of(straight[0])[0]
    jax.tree.map(np.testing.assert_array_equal, got, want)


def scalar_objective(config, **fields):
    """A scalar-head regression (a reward model in miniature): the score of each row's last real token should be
    the row's fraction of even tokens."""
    def loss(model, batch):
        scores = model.scores(batch["inputs"], batch["lengths"])
        return jnp.sum(jnp.square(scores - batch["target"])), jnp.float32(B), {}

    def train_batches(start_step):
        for index in range(start_step, 10 ** 6):
            batch = toy_batch(index)
            lengths = batch["loss_mask"].sum(1).astype(np.int32)
            even = ((batch["inputs"] % 2 == 0) * batch["loss_mask"]).sum(1) / lengths
            yield dict(inputs=batch["inputs"], lengths=lengths, target=even.astype(np.float32))

    return loop.Objective(loss=loss, train_batches=train_batches, meta=dict(objective="scalar"),
                          make_model=lambda: TransformerWithScalarHead(config.model, rngs=nnx.Rngs(1)), **fields)


def test_init_from_another_run(straight, tmp_path):
    source, _ = params_of(straight[0])
    config = make_config(train__steps=2, train__checkpoint_every=0, train__eval_every=2)
    with pytest.raises(ValueError, match=r"lacks: \['scalar_head/bias', 'scalar_head/weight'\].*init_fresh"):
        loop.Trainer(config, tmp_path / "no_fresh", scalar_objective(config, init_from=straight[0]))
    wide = make_config(model__vocab_size=80)
    with pytest.raises(ValueError, match=r"parameter embed has shape \(64, 32\) in the checkpoint but \(80, 32\)"):
        loop.Trainer(wide, tmp_path / "wide", toy_objective(wide, init_from=straight[0]))

    workdir = tmp_path / "scalar"
    objective = scalar_objective(config, init_from=straight[0], init_step=4, init_fresh=("scalar_head",))
    with loop.Trainer(config, workdir, objective) as trainer:
        params = nnx.to_pure_dict(jax.device_get(trainer.state["params"]))
        step4, _ = params_of(straight[0], 4)
        trunk = {k: v for k, v in params.items() if k != "scalar_head"}
        jax.tree.map(np.testing.assert_array_equal, trunk, step4)  # the trunk is the source's step 4
        assert not np.array_equal(step4["embed"], source["embed"])
        np.testing.assert_array_equal(params["scalar_head"]["weight"], np.zeros(32))  # the head starts fresh
        assert trainer.meta["init_from"]["step"] == 4 and trainer.meta["init_from"]["objective"] == "toy"


def test_final_checkpoint_survives_a_failing_eval_and_resume_ignores_init_from(straight, tmp_path):
    """The extra eval raises at the last step: the final checkpoint and metrics line are already written. The val
    split is empty: one warning, no val_loss. Run again: the run resumes from its own checkpoint, not init_from."""
    def failing_eval(model):
        raise RuntimeError("eval broke")

    config = make_config(train__steps=2, train__checkpoint_every=0, train__eval_every=2)
    workdir = tmp_path / "scalar"

    def objective():
        return scalar_objective(config, init_from=straight[0], init_fresh=("scalar_head",),
                                eval_batches=lambda: iter([]), evals={"broken": failing_eval})

    with pytest.raises(RuntimeError, match="eval broke"):
        loop.train(config, workdir, objective())
    assert [r["step"] for r in records(workdir)] == [1, 2] and not any("val_loss" in r for r in records(workdir))
    params, meta = params_of(workdir)  # a TransformerWithScalarHead, rebuilt from meta's model_kind
    assert meta["step"] == 2 and meta["model_kind"] == "scalar_head"
    assert meta["init_from"]["run"] == str(straight[0]) and meta["init_from"]["step"] == STEPS
    assert np.any(params["scalar_head"]["weight"] != 0)  # trained

    with loop.Trainer(make_config(train__steps=3), workdir, objective()) as trainer:
        assert trainer.start_step == 2 and trainer.meta["init_from"] == meta["init_from"]
        now = nnx.to_pure_dict(jax.device_get(trainer.state["params"]))
        jax.tree.map(np.testing.assert_array_equal, now, params)


def test_checkpoint_meta_is_computed_from_the_saved_parameters(tmp_path):
    """Objective.checkpoint_meta(model) lands in each checkpoint's meta, computed from that checkpoint's parameters
    (the final one included, which train() saves before anything else could score it)."""
    config = make_config(train__steps=4, train__eval_every=0)
    embed_sum = lambda model: {"embed_sum": float(jnp.sum(model.embed[...]))}
    loop.train(config, tmp_path, toy_objective(config, checkpoint_meta=embed_sum))
    sums = []
    for step in (2, 4):
        params, meta = params_of(tmp_path, step)
        assert meta["step"] == step and meta["objective"] == "toy"
        assert meta["embed_sum"] == pytest.approx(float(np.sum(np.asarray(params["embed"]), dtype=np.float64)), rel=1e-5)
        sums.append(meta["embed_sum"])
    assert sums[0] != sums[1]


def test_train_step_on_cpu_compiles_without_ynnpack_fusions(monkeypatch):
    """The train step's per-compile XLA option turns YNNPACK off (train.cpu_ynn_fusions=True keeps XLA's default)
    and changes no loss; a fusion type in XLA_FLAGS wins; a non-CPU mesh gets no CPU option."""
    jax.devices()  # XLA reads XLA_FLAGS (the 8 devices) once, when the backend starts; the option reads it each time
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    runs = {}
    for ynn in (False, True):
        config = make_config(train__cpu_ynn_fusions=ynn)
        mesh = lm_mesh.make_mesh(config.mesh)
        with jax.set_mesh(mesh):
            batches = [loop.global_batch(toy_batch(step), mesh) for step in range(3)]
            state, compiled = loop.fresh_state_and_step(toy_objective(config), config.train, mesh, batches[0])
            losses_seen = []
            for batch in batches:
                state, step_metrics = compiled(state, batch)
                losses_seen.append(float(step_metrics["loss"]))
        runs[ynn] = "__ynn_fusion" in compiled.as_text(), losses_seen
        assert loop.train_step_compiler_options(config.train, mesh) == ({} if ynn else {lm.YNN_FUSION_TYPE: ""})
    assert runs[False][0] is False and runs[True][0] is True
    np.testing.assert_allclose(runs[False][1], runs[True][1], rtol=1e-5)
    monkeypatch.setenv("XLA_FLAGS", f"--{lm.YNN_FUSION_TYPE}=individual_dot")
    assert loop.train_step_compiler_options(make_config().train, mesh) == {}
    monkeypatch.delenv("XLA_FLAGS")
    gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
    assert loop.train_step_compiler_options(make_config().train, gpu_mesh) == {}


HEAP_PROBE = """
import ctypes, resource, sys
from lm.train import loop
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 48 << 20  # above glibc's largest mmap threshold (32 MiB): by default mapped afresh by every malloc

def touch_faults():  # page faults of filling a fresh 48 MiB block (a train step's temp buffer, as XLA allocates it)
    block = libc.malloc(SIZE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, SIZE)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults

touch_faults()
default = touch_faults()
loop.keep_cpu_heap(SIZE)
touch_faults()
print(default, touch_faults())
"""


@pytest.mark.parametrize("user_setting", [False, True])
def test_cpu_heap_keeps_a_temp_buffers_pages_between_steps(user_setting):
    """keep_cpu_heap: a freed block the size of a train step's temps is reused with its pages still mapped (no page
    faults the next time), where glibc's default maps and faults in all ~12k pages again; a MALLOC_* setting in the
    environment is the user's and is left alone. In a subprocess: mallopt is process-wide."""
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="134217728") if user_setting else \
        {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    pages = (48 << 20) // resource.getpagesize()
    if user_setting:  # the user's trim threshold alone does not stop the mmap: faults as before
        assert kept > pages // 2
    else:
        assert default > pages // 2 and kept < pages // 20

"""Faults found by injecting them into real runs (tiny model, tiny real token set, real files, real processes):

- the newest checkpoint truncated, bit-flipped, with garbage orbax metadata or meta JSON: the run resumes from the
  newest checkpoint that restores, says which one was bad and why, and moves it to checkpoints/corrupt/;
- a partial last line in metrics.jsonl (a kill mid-write) is dropped with a warning naming the file;
- TensorBoard holds each step once after a resume (read back with TensorFlow's own event reader);
- a changed config.model is an error naming the keys that differ and what to do;
- a changed schedule is stated with both learning rates, and train.schedule_steps keeps the old one;
- `python -m lm.train` killed with SIGKILL at a random (seeded) step and run again gives the uninterrupted curve bit
  for bit, also when the newest checkpoint was corrupted before the re-run;
- lm.progress lines (count / total, rate, elapsed, ETA) without and with a terminal.
"""
import io
import json
import logging
import math
import os
import pty
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import progress as lm_progress
from lm.train import metrics, pretrain
from tests.conftest import REPO, new_workdir

OVERRIDES = {
    "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 2, "model.d_ff": 64,
    "model.max_len": 16, "model.dtype": "float32", "train.seq_len": 16, "train.batch_size": 8, "train.lr": 1e-2,
    "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 4,
    "train.keep_checkpoints": 3, "mesh.data": 8,
}
STEPS = 12
FINEWEB_DOCS, TOKENIZER_VOCAB = 60, 300   # the tokens_dir fixture (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compilation_cache")


def make_config(steps=STEPS, **overrides):
    return lm_config.load("configs/tiny.py", {**OVERRIDES, "train.steps": steps,
                                              **{k.replace("__", "."): v for k, v in overrides.items()}})


def curve(workdir):
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in
            metrics.read_metrics(workdir / "metrics.jsonl")]


def steps_on_disk(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokens_dir):
    """A straight 12-step run, and one stopped after step 10 (checkpoints 4 and 8; metrics and TensorBoard up to
    step 10, two steps past its newest checkpoint, as a kill leaves them)."""
    root = tmp_path_factory.mktemp("runs")
    straight = new_workdir(root, tokens_dir, "straight")
    pretrain.run(make_config(), straight)
    stopped = new_workdir(root, tokens_dir, "stopped")
    pretrain.run(make_config(), stopped, stop_after=10)
    assert steps_on_disk(stopped) == [4, 8] and len(curve(stopped)) == 10
    return straight, stopped


def copy_run(source, tmp_path, name="run"):
    workdir = tmp_path / name
    shutil.copytree(source, workdir, symlinks=True)
    return workdir


def tensorboard_scalars(workdir, tag="loss"):
    """[(step, value)] of `tag` in every event file under <workdir>/tb, in file order, read by TensorFlow."""
    import tensorflow as tf
    out = []
    for path in sorted((workdir / "tb").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            out += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
    return out


# --- Corrupt checkpoints -------------------------------------------------------------------------------------------

def largest_data_file(checkpoint):
    return max((p for p in (checkpoint / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def truncate_data(checkpoint):
    path = largest_data_file(checkpoint)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip_bytes(checkpoint):
    """Eight bytes in the middle of the largest array file: orbax reads this back without an error."""
    path = largest_data_file(checkpoint)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def garbage_metadata(checkpoint):
    (checkpoint / "state" / "_METADATA").write_text("{not json")


def garbage_meta(checkpoint):
    (checkpoint / "meta" / "metadata").write_text('{"step": 8, "config"')


# Flipped bytes inside a compressed chunk are caught either by zstd or, when it decodes them, by our checksums:
# which one depends on the bytes, so the in-process tests use the corruptions whose error is fixed (the SIGKILL
# test below flips bytes in a subprocess and checks the fallback whatever catches it).
CORRUPTIONS = {"truncated data file": (truncate_data, "Exception: Encountered error while reading"),
               "garbage _METADATA": (garbage_metadata, "unreadable metadata: JSONDecodeError"),
               "garbage meta JSON": (garbage_meta, "JSONDecodeError")}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back_and_is_moved_aside(runs, tmp_path, kind, caplog):
    straight, stopped = runs
    workdir = copy_run(stopped, tmp_path)
    corrupt, cause = CORRUPTIONS[kind]
    corrupt(workdir / "checkpoints" / "8")
    with caplog.at_level(logging.WARNING):
        summary = pretrain.run(make_config(), workdir)
    assert summary["start_step"] == 4 and summary["steps"] == STEPS
    assert curve(workdir) == curve(straight)  # resumed from step 4: the same floats
    (aside,) = (workdir / "checkpoints" / "corrupt").iterdir()
    assert aside.name.startswith("8-") and (aside / "meta").is_dir()  # moved, not deleted
    assert cause in (aside / "WHY.txt").read_text()
    bad = str(workdir.absolute() / "checkpoints" / "8")
    assert any(bad in r.getMessage() and cause in r.getMessage() for r in caplog.records), caplog.text
    assert any(f"moved the corrupt checkpoint {bad} to {aside}" in r.getMessage() for r in caplog.records)
    assert steps_on_disk(workdir) == [4, 8, 12]  # step 8 saved anew
    model, _, meta = lm_checkpoint.load_model(workdir)
    assert meta["step"] == STEPS


def test_no_checkpoint_restores_is_an_error_that_moves_nothing(runs, tmp_path):
    workdir = copy_run(runs[1], tmp_path)
    for step in (4, 8):
        garbage_metadata(workdir / "checkpoints" / str(step))
    with pytest.raises(lm_checkpoint.CorruptCheckpoint, match=r"no checkpoint restores: .*checkpoints/8: .*"
                                                              r"JSONDecodeError.*checkpoints/4: .*JSONDecodeError"):
        pretrain.run(make_config(), workdir)
    assert steps_on_disk(workdir) == [4, 8] and not (workdir / "checkpoints" / "corrupt").exists()
    assert len(curve(workdir)) == 10  # metrics untouched


def test_load_model_skips_a_corrupt_newest_checkpoint(runs, tmp_path):
    """Inference (read-only) takes the newest checkpoint that restores and leaves the bad one where it is."""
    workdir = copy_run(runs[1], tmp_path)
    truncate_data(workdir / "checkpoints" / "8")
    _, _, meta = lm_checkpoint.load_model(workdir)
    assert meta["step"] == 4 and steps_on_disk(workdir) == [4, 8]
    with pytest.raises(lm_checkpoint.CorruptCheckpoint, match="checkpoints/8: .*Encountered error while reading"):
        lm_checkpoint.load_model(workdir, step=8)


# --- metrics.jsonl and TensorBoard ---------------------------------------------------------------------------------

def test_partial_metrics_line_is_dropped_and_each_step_is_written_once(runs, tmp_path, caplog):
    straight, stopped = runs
    workdir = copy_run(stopped, tmp_path)
    path = workdir / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 11, "loss": 4.1')  # a kill in the middle of writing step 11's line
    with caplog.at_level(logging.WARNING):
        summary = pretrain.run(make_config(), workdir)
    assert summary["start_step"] == 8
    assert any(f"{path}:11: dropping a partial last line" in r.getMessage() for r in caplog.records), caplog.text
    assert curve(workdir) == curve(straight)  # steps 1..12 once each, equal to the straight run's
    # TensorBoard: every step once (steps 9 and 10 were there twice otherwise), the values of metrics.jsonl.
    events = tensorboard_scalars(workdir)
    assert [step for step, _ in events] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([v for _, v in events], np.float32([r["loss"] for r in curve(workdir)]))


def test_bad_metrics_line_in_the_middle_names_file_and_line(runs, tmp_path):
    workdir = copy_run(runs[1], tmp_path)
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: not a metrics record"):
        pretrain.run(make_config(), workdir)


def test_tensorboard_is_on_disk_at_each_checkpoint(runs):
    """The stopped run's events (written by the loop; stop_after closes the writer like the end of a run) and the
    straight run's: each step once, equal to metrics.jsonl."""
    straight, stopped = runs
    for workdir, steps in ((straight, STEPS), (stopped, 10)):
        events = tensorboard_scalars(workdir)
        assert [step for step, _ in events] == list(range(1, steps + 1))
        lr = tensorboard_scalars(workdir, "lr")
        np.testing.assert_array_equal([v for _, v in lr], np.float32([r["lr"] for r in curve(workdir)]))


# --- Config changes on resume --------------------------------------------------------------------------------------

def test_changed_model_config_names_the_keys_and_what_to_do(runs, tmp_path):
    workdir = copy_run(runs[1], tmp_path)
    with pytest.raises(lm_config.ConfigError) as error:
        pretrain.run(make_config(model__d_ff=128, model__n_layers=2), workdir)
    message = str(error.value)
    assert "checkpoints/8: the checkpoint does not fit" in message
    assert "model.d_ff: 64 -> 128" in message and "model.n_layers: 1 -> 2" in message
    assert "params/blocks/0/mlp/up/value: shape (32, 64) saved, (32, 128) wanted" in message
    assert "new --workdir" in message and "--force" in message and "delete" in message
    assert steps_on_disk(workdir) == [4, 8]  # nothing moved: the checkpoints are fine


def cosine_lr(step, peak=1e-2, warmup=2, horizon=STEPS, floor_ratio=0.1):
    """The lr of 0-based update `step` (hand-written: warmup, then cosine to the floor at `horizon`)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min((step - warmup) / (horizon - warmup), 1.0)
    return floor_ratio * peak + (1 - floor_ratio) * peak * 0.5 * (1 + math.cos(math.pi * t))


def test_schedule_change_is_stated_and_schedule_steps_keeps_it(runs, tmp_path, caplog):
    """Continuing the 12-step run (stopped at 10, checkpoint 8) to 20 steps stretches the cosine; the log says
    so with both learning rates of step 9. With train.schedule_steps=12 the old schedule continues (the floor
    after step 12), and nothing is said about the schedule."""
    straight, stopped = runs
    stretched = copy_run(stopped, tmp_path, "stretched")
    with caplog.at_level(logging.WARNING):
        pretrain.run(make_config(steps=14), stretched)
    (said,) = [r.getMessage() for r in caplog.records if "learning-rate schedule changed" in r.getMessage()]
    found = re.search(r"step 9 gets lr (\S+) under this config, (\S+) under the checkpoint's", said)
    assert found, said
    np.testing.assert_allclose([float(found[1]), float(found[2])], [cosine_lr(8, horizon=14), cosine_lr(8)],
                               rtol=1e-5)
    assert "--config.train.schedule_steps=12" in said
    np.testing.assert_allclose([r["lr"] for r in curve(stretched)][8:], [cosine_lr(s, horizon=14) for s in
                                                                          range(8, 14)], rtol=1e-6)

    kept = copy_run(stopped, tmp_path, "kept")
    config = make_config(steps=14)
    with config.train.unlocked():
        config.train.schedule_steps = STEPS
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pretrain.run(config, kept)
    assert not [r for r in caplog.records if "learning-rate schedule changed" in r.getMessage()]
    assert curve(kept)[:STEPS] == curve(straight)
    np.testing.assert_allclose([r["lr"] for r in curve(kept)][STEPS:], [1e-3, 1e-3], rtol=1e-6)


# --- Kill -9 and run again -----------------------------------------------------------------------------------------

KILL_STEPS = 24


def cli(workdir, compilation_cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    overrides = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": KILL_STEPS}.items()]
    env = dict(os.environ, **compilation_cache, PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.Popen([sys.executable, "-m", "lm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                             *overrides], cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)


def run_cli(workdir, compilation_cache):
    process = cli(workdir, compilation_cache)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def complete_lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def kill_at(workdir, step, compilation_cache):
    """Starts the CLI and SIGKILLs it as soon as metrics.jsonl has `step` complete lines and two checkpoints
    are complete (its output goes to a file: a full pipe would stall it)."""
    log = (workdir.parent / f"{workdir.name}.log").open("w")
    process = cli(workdir, compilation_cache, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    def due():  # the step reached, and two checkpoints finished (async saves may lag a few steps behind)
        return complete_lines(workdir / "metrics.jsonl") >= step and (workdir / "checkpoints").is_dir() and \
            len(steps_on_disk(workdir)) >= 2

    while not due() and process.poll() is None:
        assert time.monotonic() < deadline, "the run never reached the kill step"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    log.close()
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return complete_lines(workdir / "metrics.jsonl")


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tokens_dir, compilation_cache):
    """The CLI run straight to 40 steps, and a run killed (SIGKILL) at a seeded random step."""
    root = tmp_path_factory.mktemp("kill")
    straight = new_workdir(root, tokens_dir, "straight")
    _, err = run_cli(straight, compilation_cache)
    assert f"train {KILL_STEPS}/{KILL_STEPS} steps (100%)" in err and "elapsed" in err  # the progress line
    victim = new_workdir(root, tokens_dir, "killed")
    kill_step = random.Random(14).randint(6, 18)
    reached = kill_at(victim, kill_step, compilation_cache)
    assert kill_step <= reached < KILL_STEPS
    return straight, victim


def test_sigkill_and_rerun_gives_the_uninterrupted_curve(killed, tmp_path, compilation_cache):
    straight, victim = killed
    workdir = copy_run(victim, tmp_path)
    summary, _ = run_cli(workdir, compilation_cache)
    assert 0 < summary["start_step"] < KILL_STEPS and summary["steps"] == KILL_STEPS
    assert curve(workdir) == curve(straight)  # each step once, every float equal
    events = tensorboard_scalars(workdir)
    assert [step for step, _ in events] == list(range(1, KILL_STEPS + 1))
    np.testing.assert_array_equal([v for _, v in events], np.float32([r["loss"] for r in curve(straight)]))


def test_sigkill_with_the_newest_checkpoint_corrupted(killed, tmp_path, compilation_cache):
    straight, victim = killed
    workdir = copy_run(victim, tmp_path)
    newest = max(steps_on_disk(workdir))
    flip_bytes(workdir / "checkpoints" / str(newest))
    summary, err = run_cli(workdir, compilation_cache)
    assert summary["start_step"] == newest - 4 and summary["steps"] == KILL_STEPS
    assert f"checkpoints/{newest} does not restore" in err
    assert curve(workdir) == curve(straight)
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints" / "corrupt").iterdir()] == [str(newest)]


# --- Progress lines ------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_counts_rate_elapsed_and_eta():
    clock, out = Clock(), io.StringIO()
    progress = lm_progress.Progress("train", total=600, unit="steps", start=200, every=10, stream=out, clock=clock)
    clock.now = 130.0  # the first update (e.g. compilation took 30 s): the rate counts from here
    progress.update(201)
    assert out.getvalue() == "train 201/600 steps (34%) | elapsed 30s\n"
    clock.now = 135.0
    progress.update(221, note="loss 3.2")  # 5 s since the last line: not yet
    assert out.getvalue().count("\n") == 1
    clock.now = 141.0
    progress.update(245, note="loss 3.1")  # 44 steps in 11 s = 4 steps/s; 355 left = 88.75 s
    assert out.getvalue().splitlines()[-1] == \
        "train 245/600 steps (41%) | 4 steps/s | elapsed 41s | ETA 1m29s | loss 3.1"
    clock.now = 240.0
    progress.update(600)
    progress.close()
    progress.close()
    last = out.getvalue().splitlines()
    assert len(last) == 4 and last[-1] == "train 600/600 steps (100%) | 3.63 steps/s | elapsed 2m20s | loss 3.1"
    assert "ETA" not in last[-1]
    assert lm_progress.duration(7265) == "2h01m"
    quiet = io.StringIO()
    lm_progress.Progress("x", stream=quiet, enabled=False, every=0).update(5)
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_redraws_in_place():
    """On a real pseudo-terminal: carriage returns and clear-to-end-of-line, one newline at the end."""
    primary, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as terminal:
        progress = lm_progress.Progress("tokenize", unit="documents", stream=terminal, every=0)
        assert progress.tty and progress.every == 0
        for count in (10, 20):
            progress.update(count, note="1.0 MB")
        progress.close()
        written = ""
        while not written.endswith("\n"):  # what the terminal received, in as many reads as it takes
            written += os.read(primary, 4096).decode()
    os.close(primary)
    assert written.startswith("\rtokenize 10 documents | elapsed 0s | 1.0 MB\x1b[K\r")
    assert "\rtokenize 20 documents" in written and written.endswith("\x1b[K\r\n")
    assert lm_progress.Progress("x", stream=io.StringIO()).every == lm_progress.LOG_EVERY

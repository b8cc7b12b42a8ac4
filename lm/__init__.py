"""lm: a small LLM pipeline in JAX / Flax NNX.

`apply_xla_defaults` (run on import) puts lm's suggested XLA flags (XLA_DEFAULTS) into XLA_FLAGS when
LM_XLA_DEFAULTS=1 is in the environment; without it XLA_FLAGS is left alone. XLA reads XLA_FLAGS once, when the
first backend starts, so this must run before anything touches a device: every entry point (the CLI, tests,
benchmarks) imports `lm` first, and `import jax` alone does not start a backend.

Why opt-in, not the default: turning jaxlib 0.10.2's YNNPACK fusions off made the training step 1.00-1.25x faster in
benchmarks/bench_train.py's quiet run (lever ynn_off), but made KV-cache decoding at batch 8 about 2.4x slower
(benchmarks/bench_sample.py, tiny config, contended A/B, 3 processes each); the flag is per process, and a process
that trains also samples (evals, RL rollouts). Set LM_XLA_DEFAULTS=1 for pure pretraining / SFT runs.
"""
import os

# name -> value. Only CPU flags: other backends ignore them (a GPU host still has a CPU client; it gets them too).
XLA_DEFAULTS = {
    # jaxlib 0.10.2 routes dots and some reductions through YNNPACK "__ynn_fusion"s on CPU; an empty fusion type
    # turns that off (plain XLA / Eigen kernels). See the module doc for what it wins and loses.
    "--xla_cpu_experimental_ynn_fusion_type": "",
}


def apply_xla_defaults(environ=os.environ) -> str:
    """With environ["LM_XLA_DEFAULTS"] == "1": appends each XLA_DEFAULTS flag to environ["XLA_FLAGS"] unless the
    flag is already set there (the user's setting wins); -> the resulting XLA_FLAGS. Too late (ignored by XLA) once
    a backend has started."""
    if environ.get("LM_XLA_DEFAULTS", "0") != "1":
        return environ.get("XLA_FLAGS", "")
    flags = environ.get("XLA_FLAGS", "")
    given = {token.split("=", 1)[0] for token in flags.split()}
    extra = [f"{name}={value}" for name, value in XLA_DEFAULTS.items() if name not in given]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return environ.get("XLA_FLAGS", "")


apply_xla_defaults()

"""lm: a small LLM pipeline in JAX / Flax NNX.

`apply_xla_defaults` (run on import) puts lm's suggested XLA flags (XLA_DEFAULTS) into XLA_FLAGS when
LM_XLA_DEFAULTS=1 is in the environment; without it XLA_FLAGS is left alone. XLA reads XLA_FLAGS once, when the
first backend starts, so this must run before anything touches a device: every entry point (the CLI, tests,
benchmarks) imports `lm` first, and `import jax` alone does not start a backend.

The train step gets YNNPACK off without any flag: lm.train.loop.compile_train_step passes the fusion type as a
per-compile XLA option on CPU (`train_step_compiler_options`, config train.cpu_ynn_fusions, default False), so
sampling, decoding and evals in the same process keep XLA's defaults. Turning jaxlib 0.10.2's YNNPACK fusions off made
the training step 1.00-1.25x faster in benchmarks/bench_train.py's quiet run (lever ynn_off) but KV-cache decoding at
batch 8 about 2.4x slower (benchmarks/bench_sample.py, tiny config, contended A/B). LM_XLA_DEFAULTS=1 turns it off for
every program of the process (pure pretraining / SFT runs, where nothing else compiles much); a fusion type set in
XLA_FLAGS, by the user or by LM_XLA_DEFAULTS, also wins over the train step's option.
"""
import os

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"  # an XLA option: the flag's name without "--"

# name -> value. Only CPU flags: other backends ignore them (a GPU host still has a CPU client; it gets them too).
XLA_DEFAULTS = {
    # jaxlib 0.10.2 routes dots and some reductions through YNNPACK "__ynn_fusion"s on CPU; an empty fusion type
    # turns that off (plain XLA / Eigen kernels). See the module doc for what it wins and loses.
    f"--{YNN_FUSION_TYPE}": "",
}


def apply_xla_defaults(environ=os.environ) -> str:
    """With environ["LM_XLA_DEFAULTS"] == "1": appends each XLA_DEFAULTS flag to environ["XLA_FLAGS"] unless the
    flag is already set there (the user's setting wins); -> the resulting XLA_FLAGS. Too late (ignored by XLA) once
    a backend has started."""
    if environ.get("LM_XLA_DEFAULTS", "0") != "1":
        return environ.get("XLA_FLAGS", "")
    flags = environ.get("XLA_FLAGS", "")
    given = xla_flags_given(environ)
    extra = [f"{name}={value}" for name, value in XLA_DEFAULTS.items() if name not in given]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return environ.get("XLA_FLAGS", "")


def xla_flags_given(environ=os.environ) -> set:
    """The flags environ["XLA_FLAGS"] sets, as "--name" (with or without a value)."""
    return {token.split("=", 1)[0] for token in environ.get("XLA_FLAGS", "").split()}


apply_xla_defaults()

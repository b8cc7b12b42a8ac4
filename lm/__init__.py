"""lm: a small LLM pipeline in JAX / Flax NNX.

Importing the package sets lm's default XLA flags (`apply_xla_defaults`) in the environment. XLA reads XLA_FLAGS
once, when the first backend starts, so this must run before anything touches a device; every entry point (the
CLI, tests, benchmarks) imports `lm` first, and `import jax` alone does not start a backend. LM_XLA_DEFAULTS=0 in
the environment leaves XLA_FLAGS alone (jaxlib's own defaults: for A/B comparisons).
"""
import os

# name -> value. Only CPU flags: other backends ignore them (a GPU host still has a CPU client; it gets them too).
XLA_DEFAULTS = {
    # jaxlib 0.10.2 routes dots and some reductions through YNNPACK "__ynn_fusion"s on CPU. An empty fusion type
    # turns that off (plain XLA / Eigen kernels): in benchmarks/bench_train.py's quiet run the training step was
    # 1.00-1.25x faster without it at every shape (lever ynn_off) and never slower. bench_train's ynn_on lever
    # measures the old default.
    "--xla_cpu_experimental_ynn_fusion_type": "",
}


def apply_xla_defaults(environ=os.environ) -> str:
    """Appends each XLA_DEFAULTS flag to environ["XLA_FLAGS"] unless the flag is already set there (the user's
    setting wins); -> the resulting XLA_FLAGS. Too late (ignored by XLA) once a backend has started."""
    if environ.get("LM_XLA_DEFAULTS", "1") == "0":
        return environ.get("XLA_FLAGS", "")
    flags = environ.get("XLA_FLAGS", "")
    given = {token.split("=", 1)[0] for token in flags.split()}
    extra = [f"{name}={value}" for name, value in XLA_DEFAULTS.items() if name not in given]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return environ.get("XLA_FLAGS", "")


apply_xla_defaults()

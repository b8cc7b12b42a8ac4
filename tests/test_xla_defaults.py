"""lm's suggested XLA flags (lm/__init__.py): with LM_XLA_DEFAULTS=1 applied on import unless the user set the flag,
and seen by XLA; without it XLA_FLAGS is left alone."""
import os
import pathlib
import subprocess
import sys

import lm

REPO = pathlib.Path(__file__).resolve().parents[1]
# Compiles a dot after the given imports and prints whether XLA made a YNNPACK fusion of it.
PROBE = """
import {imports}
import jax, jax.numpy as jnp
x = jnp.ones((64, 64))
print("__ynn_fusion" in jax.jit(lambda a: jnp.tanh(a @ a).sum()).lower(x).compile().as_text())
"""


def ynn_fusion_used(imports: str, xla_flags: str | None, opt_in: str = "1") -> bool:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LM_XLA_DEFAULTS")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", LM_XLA_DEFAULTS=opt_in,
               **({"XLA_FLAGS": xla_flags} if xla_flags is not None else {}))
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_defaults_append_without_overriding_the_user():
    on = {"LM_XLA_DEFAULTS": "1"}
    env = dict(on)
    assert lm.apply_xla_defaults(env) == "--xla_cpu_experimental_ynn_fusion_type="
    env = {**on, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert lm.apply_xla_defaults(env).split() == ["--xla_force_host_platform_device_count=2",
                                                 "--xla_cpu_experimental_ynn_fusion_type="]
    env = {**on, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    assert lm.apply_xla_defaults(env) == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert lm.apply_xla_defaults(env) == env["XLA_FLAGS"]  # idempotent
    assert lm.apply_xla_defaults({}) == "" and lm.apply_xla_defaults({"LM_XLA_DEFAULTS": "0"}) == ""  # not opted in


def test_xla_sees_the_defaults():
    assert ynn_fusion_used("os", None)  # plain jax fuses the dot into YNNPACK (so the probe can tell)
    assert ynn_fusion_used("lm", None, opt_in="0")  # lm leaves it on unless opted in
    assert not ynn_fusion_used("lm", None)  # opted in, importing lm turns it off, also with `import jax` first:
    assert not ynn_fusion_used("jax, lm", "--xla_force_host_platform_device_count=2")
    assert ynn_fusion_used("lm", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")  # the user's flag wins

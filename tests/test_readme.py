"""Every `python -m ...` command in the README names a module that runs and flags it defines (and config keys that
exist), so a renamed module or flag cannot leave the README wrong. Each module's --helpfull runs as a real process."""
import functools
import re
import shlex
import subprocess
import sys

import pytest

from lm import config as lm_config

README = lm_config.REPO / "README.md"
COMMAND = re.compile(r"python -m (lm[\w.]*)([^`|#\n]*)")


def readme_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for module, rest in COMMAND.findall(README.read_text()):
        rest = re.sub(r"\[[^\]]*\]", "", rest)  # optional parts: [--data=PATHS]
        words = [w for w in shlex.split(rest.strip(), posix=True) if w.startswith("--")]
        commands.append((module, words))
    return commands


@functools.lru_cache(maxsize=None)
def help_text(module: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, "--helpfull"], capture_output=True, text=True,
                         cwd=lm_config.REPO, timeout=300)
    assert out.returncode in (0, 1), f"python -m {module} --helpfull failed:\n{out.stderr[-2000:]}"
    return out.stdout + out.stderr


def test_readme_names_commands():
    modules = {m for m, _ in readme_commands()}
    assert {"lm.main", "lm.train", "lm.sample", "lm.chat", "lm.serve", "lm.data.filter"} <= modules


@pytest.mark.parametrize("module", sorted({m for m, _ in readme_commands()}))
def test_readme_command_flags_exist(module):
    text = help_text(module)
    for _, words in (c for c in readme_commands() if c[0] == module):
        config_spec = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), None)
        for word in words:
            name = word[2:].split("=", 1)[0]
            if name.startswith("config."):
                config = lm_config.load(config_spec or "configs/tiny.py")
                lm_config.check_key(config, name.removeprefix("config."))
            else:
                assert re.search(rf"--(\[no\])?{re.escape(name)}\b", text), f"README: python -m {module} --{name}"

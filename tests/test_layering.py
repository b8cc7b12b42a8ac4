"""Imports run one way, lowest first, and no modules import each other in a circle.

Levels, lowest first (a module may import its own level and lower ones, never a higher one, not even inside a
function):

    config      lm.config, lm.mesh, lm.progress (and the empty package lm itself)
    tokenizer   lm.tokenizer
    data        lm.data
    model       lm.model (lm.model.hf converts HF weights: it needs only the model)
    checkpoint  lm.checkpoint, lm.hf (the program of lm.model.hf: it reads run checkpoints)
    sample      lm.sample
    eval        lm.eval
    train       lm.train
    chat/serve  lm.chat, lm.serve
    main        lm.main, lm.report (report.md renders the results of every stage)
    configs     configs (config-as-code may use any part of lm; nothing in lm imports it: lm.config loads
                presets by path)

Every module of lm/ and configs/ is read with `ast` (nothing is imported), including imports inside functions.
A violation prints as `file:line imports X (level) from level Y`; a cycle prints the imports that close it.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ("lm", "configs")

LEVELS = (
    ("config", ("lm", "lm.config", "lm.mesh", "lm.progress")),
    ("tokenizer", ("lm.tokenizer",)),
    ("data", ("lm.data",)),
    ("model", ("lm.model",)),
    ("checkpoint", ("lm.checkpoint", "lm.hf")),
    ("sample", ("lm.sample",)),
    ("eval", ("lm.eval",)),
    ("train", ("lm.train",)),
    ("chat/serve", ("lm.chat", "lm.serve")),
    ("main", ("lm.main", "lm.report")),
    ("configs", ("configs",)),
)


def level_of(module: str):
    """(rank, name) of the level whose longest prefix matches `module`, or None for a module without a level.
    "lm" names only the package itself, so a new lm.<x> needs a level of its own."""
    best = None
    for rank, (name, prefixes) in enumerate(LEVELS):
        for prefix in prefixes:
            if module == prefix or (prefix != "lm" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[2]:
                    best = (rank, name, len(prefix))
    return best and best[:2]


def modules(repo: pathlib.Path, roots=ROOTS) -> dict:
    """{dotted module name: path} of every .py file under the roots (a package is its __init__.py)."""
    found = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            parts = path.relative_to(repo).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: pathlib.Path, known: dict):
    """(line, imported module) for every import of our modules in `path`; `from pkg import name` counts as
    pkg.name when that is a module, else as pkg."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ROOTS:
                yield node.lineno, target


def graph(repo: pathlib.Path, roots=ROOTS) -> dict:
    """{module: [(line, imported module)]} for every module under the roots."""
    known = modules(repo, roots)
    return {name: sorted(set(imports(name, path, known))) for name, path in known.items()}, known


def upward_imports(repo: pathlib.Path, roots=ROOTS) -> list:
    edges, known = graph(repo, roots)
    problems = []
    for module, targets in edges.items():
        here = level_of(module)
        where = known[module].relative_to(repo)
        if here is None:
            problems.append(f"{where}: module {module} has no level in tests/test_layering.py LEVELS")
            continue
        for line, target in targets:
            there = level_of(target)
            if there is None:
                problems.append(f"{where}:{line} imports {target}, which has no level in LEVELS")
            elif there[0] > here[0]:
                problems.append(f"{where}:{line} imports {target} ({there[1]}) from level {here[1]}")
    return problems


def import_cycles(repo: pathlib.Path, roots=ROOTS) -> list:
    """One message per group of modules that import each other in a circle (Tarjan's strongly connected
    components), listing the imports inside the group."""
    edges, known = graph(repo, roots)
    # A module importing itself (lm.data.filter's main imports the module by name for its worker processes) is
    # not a cycle.
    successors = {m: [t for _, t in targets if t in edges and t != m] for m, targets in edges.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in successors[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    messages = []
    for group in groups:
        links = [f"{known[m].relative_to(repo)}:{line} imports {t}" for m in sorted(group)
                 for line, t in edges[m] if t in group and t != m]
        messages.append(f"import cycle among {', '.join(sorted(group))}: " + "; ".join(links))
    return messages


def test_imports_run_one_way():
    problems = upward_imports(REPO)
    print("\n".join(problems))
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(REPO)
    print("\n".join(cycles))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_find_what_they_should(tmp_path):
    """A small tree with an upward import inside a function, a relative-import cycle, a module without a level."""
    files = {
        "lm/__init__.py": "",
        "lm/config.py": "import os\n",
        "lm/sample.py": "from lm import config\n\ndef f():\n    from lm.eval import icl\n",
        "lm/eval/__init__.py": "",
        "lm/eval/icl.py": "from . import graders\nfrom lm import sample\n",
        "lm/eval/graders.py": "def g():\n    from .icl import x\n",
        "lm/nowhere.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert upward_imports(tmp_path, ("lm",)) == [
        "lm/nowhere.py: module lm.nowhere has no level in tests/test_layering.py LEVELS",
        "lm/sample.py:4 imports lm.eval.icl (eval) from level sample"]
    # The upward import closes a second loop (icl -> sample -> icl): one group of three modules.
    assert import_cycles(tmp_path, ("lm",)) == [
        "import cycle among lm.eval.graders, lm.eval.icl, lm.sample: lm/eval/graders.py:2 imports lm.eval.icl; "
        "lm/eval/icl.py:1 imports lm.eval.graders; lm/eval/icl.py:2 imports lm.sample; "
        "lm/sample.py:4 imports lm.eval.icl"]


@pytest.mark.parametrize("module, level", [("lm.model.hf", "model"), ("lm.hf", "checkpoint"),
                                           ("lm.eval.icl", "eval"), ("lm.train.loop", "train"),
                                           ("configs.tiny", "configs"), ("lm.mesh", "config"),
                                           ("lm.progress", "config")])
def test_levels(module, level):
    assert level_of(module)[1] == level

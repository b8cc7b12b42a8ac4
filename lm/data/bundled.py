"""The bundled default corpus: CPython's own documentation, which ships with every Python installation.

One document per language-reference topic (`pydoc_data.topics`) and one per public standard-library module (its
docstring and the docstrings of its public classes, functions and methods). Pure-Python modules are read with `ast`
(nothing is imported, so no module's import side effects run); only built-in and extension modules are imported.

    python -m lm.data.bundled --output=/tmp/python_docs.jsonl.gz
"""
import ast
import gzip
import importlib
import importlib.util
import inspect
import json
import pathlib
import sys
import sysconfig
import warnings

from absl import app, flags, logging

SOURCE_TOPICS = "pydoc_data.topics"
SOURCE_MODULES = "stdlib"
# Tests, demos and private helpers are not documentation; readline changes the terminal when imported.
SKIP_PARTS = {"test", "tests", "idle_test", "turtledemo", "__main__", "__pycache__", "site-packages"}
SKIP_IMPORT = {"readline", "antigravity", "this"}


def write_corpus(path) -> int:
    """Writes the corpus as jsonl.gz records {text, id, source, python_version}; returns the number of documents."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in documents():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    logging.info("bundled corpus: %d documents written to %s", count, path)
    return count


def documents():
    """Yields {text, id, source, python_version}, topics first, then modules in name order."""
    version = ".".join(map(str, sys.version_info[:3]))
    for name, text in sorted(topics().items()):
        yield {"text": text, "id": f"python-docs/topic/{name}", "source": SOURCE_TOPICS, "python_version": version}
    for name, text in modules():
        yield {"text": text, "id": f"python-docs/module/{name}", "source": SOURCE_MODULES, "python_version": version}


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as pydoc_topics
    return {name: text.strip() + "\n" for name, text in pydoc_topics.items() if text.strip()}


def modules():
    """Yields (dotted name, text) for every public standard-library module that has any documentation."""
    for name, source in sorted(module_sources().items()):
        text = render_source(name, source) if source else render_imported(name)
        if text:
            yield name, text


def module_sources() -> dict[str, pathlib.Path | None]:
    """Public stdlib module names -> their .py file, or None for built-in / extension modules."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = {}
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_IMPORT:
            continue
        package = stdlib / top
        if (package / "__init__.py").is_file():
            for file in sorted(package.rglob("*.py")):
                parts = file.relative_to(stdlib).with_suffix("").parts
                if any(p in SKIP_PARTS or (p.startswith("_") and p != "__init__") for p in parts):
                    continue
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
        elif (stdlib / f"{top}.py").is_file():
            found[top] = stdlib / f"{top}.py"
        elif top in sys.builtin_module_names or importlib.util.find_spec(top) is not None:
            found[top] = None
    return found


def render_source(name: str, path: pathlib.Path) -> str:
    """Module, class, function and method docstrings of a .py file, read with ast."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as e:
        logging.warning("bundled corpus: skipping %s (%s)", path, e)
        return ""
    blocks = _doc_blocks(tree, prefix="")
    module_doc = ast.get_docstring(tree)
    if not module_doc and not blocks:
        return ""
    return _join(name, module_doc, blocks)


def _doc_blocks(node, prefix: str) -> list[str]:
    blocks = []
    for child in node.body:
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or child.name.startswith("_"):
            continue
        qualname = prefix + child.name
        doc = ast.get_docstring(child)
        if isinstance(child, ast.ClassDef):
            if doc:
                blocks.append(f"class {qualname}\n{doc}")
            blocks.extend(_doc_blocks(child, prefix=qualname + "."))
        elif doc:
            blocks.append(f"{qualname}({ast.unparse(child.args)})\n{doc}")
    return blocks


def render_imported(name: str) -> str:
    """The same for a built-in or extension module, which has no source: import it and read __doc__."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a platform without the module simply has no document for it
        logging.info("bundled corpus: cannot import %s (%s)", name, e)
        return ""
    blocks = []
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", name) != name:
            continue
        if inspect.isclass(obj):
            blocks.extend(_class_blocks(attr, obj))
        elif callable(obj) and (doc := inspect.getdoc(obj)):
            blocks.append(doc if doc.startswith(attr) else f"{attr}\n{doc}")
    module_doc = inspect.getdoc(module)
    if not module_doc and not blocks:
        return ""
    return _join(name, module_doc, blocks)


def _class_blocks(name, cls) -> list[str]:
    blocks = [f"class {name}\n{doc}"] if (doc := inspect.getdoc(cls)) else []
    for attr, obj in sorted(vars(cls).items()):
        if not attr.startswith("_") and callable(obj) and (doc := obj.__doc__):
            blocks.append(f"{name}.{attr}\n{inspect.cleandoc(doc)}")
    return blocks


def _join(name, module_doc, blocks) -> str:
    head = f"Module {name}\n\n{module_doc}" if module_doc else f"Module {name}"
    return "\n\n".join([head, *blocks]).strip() + "\n"


def main(argv):
    del argv
    output = flags.FLAGS.output
    count = write_corpus(output)
    print(f"{count} documents, {pathlib.Path(output).stat().st_size / 1e6:.2f} MB compressed -> {output}")


if __name__ == "__main__":
    # Flags are defined here, not at import, so that lm.main can import this module next to other stages.
    flags.DEFINE_string("output", None, "Where to write the corpus (.jsonl.gz).", required=True)
    app.run(main)

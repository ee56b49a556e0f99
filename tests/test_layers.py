"""The imports run one way. Every .py file of the project is read with `ast` (no module is imported), and each
import of a project module is checked against the layers, lowest first:

    utils < models < runtime < pruners, gates, deploy < stages < search < scripts (main_*.py, demo.py, evaluation/, bench/)

- a package module imports only from its own package or from a package of a lower layer (pruners, gates and
  deploy, one layer, import none of each other);
- no package module imports a script: main_*.py and demo.py, everything under evaluation/ and bench/ (their
  commands and the modules only they share);
- the evaluation never imports the benchmarks (bench/ may use the evaluation's runner and data);
- no two packages import each other, through any chain of modules;
- a project module is imported by its full name from the repository root (`from evaluation.stats import ...`,
  never `from stats import ...` after a sys.path edit).

Scripts and tests may import any layer. Imports inside functions count like the others."""
import ast
import os

from conftest import ROOT

LAYERS = {"utils": 0, "models": 1, "runtime": 2, "pruners": 3, "gates": 3, "deploy": 3, "stages": 4, "search": 5}
SCRIPT_PACKAGES = ("evaluation", "bench")
SKIP = {".git", "__pycache__", "out", "results", "shared"}


def python_files():
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, name), ROOT)


def module_name(path):
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in python_files()}
TOP = {name.split(".")[0] for name in MODULES}
# the script packages' modules by their bare names: what a sys.path edit pointing into one would let one import
BARE = {m.split(".")[1]: m.split(".")[0] for m in MODULES if m.split(".")[0] in SCRIPT_PACKAGES and "." in m}


def is_script(module):
    top = module.split(".")[0]
    return top in SCRIPT_PACKAGES or (top == module and top not in LAYERS
                                                                   and top != "tests")


def package(module):
    """The layered package a module belongs to; None for scripts and tests."""
    top = module.split(".")[0]
    return top if top in LAYERS and not is_script(module) else None


def imports(path):
    """(line, imported module) of every import of a project module in the file; a `from X import Y` where
    X.Y is a module names X.Y."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            out += [(node.lineno, m) for m in subs] or [(node.lineno, node.module)]
    return [(line, name) for line, name in out if name.split(".")[0] in TOP or name.split(".")[0] in BARE]



def edges():
    """(importer, imported, where) of every import of a project module."""
    out = []
    for module, path in MODULES.items():
        if module.split(".")[0] == "tests":
            continue
        for line, name in imports(path):
            out.append((module, name, f"{path}:{line}"))
    return out


def test_every_project_module_is_imported_by_its_full_name():
    bare = [f"{where}: import {name} (use {BARE[top]}.{top})" for _, name, where in edges()
            for top in [name.split(".")[0]] if top in BARE and top not in TOP]
    assert not bare, "\n".join(bare)


def test_no_upward_import():
    bad = []
    for importer, name, where in edges():
        mine, theirs = package(importer), package(name)
        if mine is None or name.split(".")[0] not in TOP:
            continue
        if theirs is None:
            bad.append(f"{where}: {importer} imports the script {name}")
        elif theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
            bad.append(f"{where}: {importer} ({mine}, layer {LAYERS[mine]}) imports {name} ({theirs}, layer "
                       f"{LAYERS[theirs]})")
    assert not bad, "\n".join(bad)


def test_no_package_module_imports_a_script():
    bad = [f"{where}: {importer} imports {name}" for importer, name, where in edges()
           if package(importer) is not None and name.split(".")[0] in TOP and is_script(name)]
    assert not bad, "\n".join(bad)


def test_the_evaluation_never_imports_the_benchmarks():
    bad = [f"{where}: {importer} imports {name}" for importer, name, where in edges()
           if importer.split(".")[0] == "evaluation" and name.split(".")[0] == "bench"]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph = {}
    for importer, name, _ in edges():
        a, b = package(importer), package(name) if name.split(".")[0] in TOP else None
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)

    def cycle_from(start, node, seen):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node] + rest
        return None

    cycles = [" -> ".join(c) for c in (cycle_from(p, p, set()) for p in sorted(graph)) if c]
    assert not cycles, "\n".join(cycles)


def test_the_layers_cover_every_package():
    """A new package must be given its layer (or be a script package) before it is used."""
    packages = {m.split(".")[0] for m, p in MODULES.items() if p.endswith("__init__.py") and "." not in m}
    assert packages - {"tests"} <= set(LAYERS) | set(SCRIPT_PACKAGES), packages - set(LAYERS) - set(SCRIPT_PACKAGES)


def test_the_product_imports_no_evaluation_only_library():
    """scikit-learn (the digits datasets) serves the evaluation only: no package of the product imports it."""
    bad = []
    for module, path in MODULES.items():
        if package(module) is None:
            continue
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{path}:{node.lineno}: {name}" for name in names if name.split(".")[0] == "sklearn"]
    assert not bad, "\n".join(bad)

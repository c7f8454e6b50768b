"""Import rules of the code base (DESIGN.md, docs/engine.md):

    layers <- data
    layers <- models (with registry) <- detection <- convert (with the flexvision package)
           <- engine <- {train, benchmark, evaluate, experiments, configs}

A module may import its own layer and the layers to its left, never one to its right; nothing
outside ``flexvision.train`` imports the training application ``flexvision.train``; and no
module imports itself back through a chain of others (a cycle). Imports inside functions count.
The training library imports no TensorFlow.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("flexvision", "configs", "experiments")

# (layer, module prefixes), from the bottom up: a layer may import itself and the layers above
# it in this list.
LAYERS = (
    ("layers", ("flexvision.layers",)),
    ("data", ("flexvision.data",)),
    ("models", ("flexvision.models", "flexvision.registry")),
    ("detection", ("flexvision.detection",)),
    # weight import builds models and detection heads; the package's own __init__ exports it
    ("convert", ("flexvision.convert", "flexvision")),
    ("engine", ("flexvision.engine",)),
    ("applications", ("flexvision.train", "flexvision.benchmark", "flexvision.evaluate",
                      "experiments", "configs")),
)
APPLICATION = "flexvision.train"


def module_files(repo: str, roots=ROOTS) -> dict[str, str]:
    """Dotted module name -> path of every .py file under ``roots`` (packages by __init__)."""
    modules = {}
    for root in roots:
        for directory, _, files in os.walk(os.path.join(repo, root)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, repo)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, at any depth.
    ``from package import name`` counts as importing ``package.name`` when that is a module."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno))
    return found


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the layer owning ``module`` (longest matching prefix)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "flexvision"
                                           and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def import_graph(repo: str) -> tuple[dict[str, str], dict[str, list[tuple[str, int]]]]:
    files = module_files(repo)
    known = set(files)
    return files, {m: imports_of(m, p, known) for m, p in files.items()}


def violations(repo: str) -> list[str]:
    """Every forbidden edge and every import cycle of the tree at ``repo``, as messages."""
    files, graph = import_graph(repo)
    problems = []
    for module, edges in sorted(graph.items()):
        own = layer_of(module)
        where = os.path.relpath(files[module], repo)
        if own is None:
            problems.append(f"{where}: module {module} belongs to no layer; add its package "
                            f"to LAYERS in tests/test_imports.py (and to the layering in DESIGN)")
            continue
        for target, line in edges:
            if target == module:
                continue
            other = layer_of(target)
            if target.startswith(APPLICATION) and not module.startswith(APPLICATION + ".") \
                    and module != APPLICATION:
                problems.append(f"{where}:{line}: {module} imports {target}: nothing outside "
                                f"flexvision.train imports the training application (use "
                                f"flexvision.engine)")
            elif other is not None and other > own:
                problems.append(f"{where}:{line}: {module} ({LAYERS[own][0]}) imports {target} "
                                f"({LAYERS[other][0]}): a layer may only import itself and "
                                f"the layers below it")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module
    (Tarjan's algorithm), each as [a, b, ..., a]."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, ()):
            if target == node:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_cycle_in(sorted(component), graph))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_in(component: list[str], graph) -> list[str]:
    """A closed path inside a strongly connected ``component``, from its first module."""
    members, start = set(component), component[0]
    path, seen = [start], {start}
    while True:
        step = next(t for t, _ in graph[path[-1]] if t in members and t != path[-1]
                    and (t == start or t not in seen))
        path.append(step)
        if step == start:
            return path
        if step in seen:  # pragma: no cover - a strongly connected component always closes
            return path
        seen.add(step)


def test_the_tree_follows_the_import_rules():
    problems = violations(REPO)
    assert not problems, "import rule violations:\n  " + "\n  ".join(problems)


def test_the_checker_finds_forbidden_edges_and_cycles(tmp_path):
    def write(relative, text):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("flexvision/__init__.py", "")
    write("flexvision/layers/__init__.py", "")
    write("flexvision/layers/flex.py", "import numpy\n")
    write("flexvision/engine/__init__.py", "")
    write("flexvision/engine/step.py", "from flexvision.layers import flex\n")
    write("flexvision/engine/state.py",
          "def f():\n    from flexvision.train import trainer\n")  # library -> application
    write("flexvision/train/__init__.py", "")
    write("flexvision/train/trainer.py", "from . import distill\n")
    write("flexvision/train/distill.py", "def g():\n    from flexvision.train import trainer\n")
    write("flexvision/models/__init__.py", "")
    write("flexvision/models/vit.py", "from flexvision.engine.step import make_train_step\n")
    write("configs/a.py", "from flexvision.train.trainer import train_and_evaluate\n")
    write("experiments/__init__.py", "")
    problems = violations(str(tmp_path))
    assert any("flexvision.engine.state imports flexvision.train.trainer" in p
               for p in problems), problems
    assert any("configs.a imports flexvision.train.trainer" in p for p in problems), problems
    assert any("flexvision.models.vit (models) imports flexvision.engine.step (engine)" in p
               for p in problems), problems
    assert "import cycle: flexvision.train.distill -> flexvision.train.trainer -> " \
           "flexvision.train.distill" in problems, problems
    assert len(problems) == 4, problems


@pytest.mark.parametrize("module", ["flexvision.engine"])
def test_engine_imports_no_tensorflow(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout

"""The layers of docs/architecture.md, checked on the source: who may import whom, no import
circles, and the size limits (modules <= 500 lines, functions <= 80)."""
from __future__ import annotations

import ast
import os

import pytest
from helpers import REPO

ROOT = os.path.join(REPO, "trust_fast")


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


MODULES = _modules()


def _imports(name: str, top_level_only: bool) -> set[str]:
    """The trust_fast modules `name` imports (all of them, or those at import time only)."""
    path = MODULES[name]
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.startswith("trust_fast") and t in MODULES}
    out.discard(name)
    return out


def _under(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


# layer -> layers it must never import (at import time or lazily)
FORBIDDEN = {
    "trust_fast.engine": ("trust_fast.cli", "trust_fast.world", "trust_fast.evaluation"),
    "trust_fast.methods": ("trust_fast.engine", "trust_fast.cli", "trust_fast.world", "trust_fast.evaluation"),
    "trust_fast.ops": ("trust_fast.engine", "trust_fast.methods", "trust_fast.models", "trust_fast.cli",
                       "trust_fast.world", "trust_fast.evaluation", "trust_fast.config"),
    "trust_fast.models": ("trust_fast.engine", "trust_fast.methods", "trust_fast.cli", "trust_fast.evaluation"),
    # (config reads the methods' registries when it validates: a lazy import, never at import time)
    "trust_fast.config": ("trust_fast.engine", "trust_fast.cli", "trust_fast.world", "trust_fast.evaluation",
                          "trust_fast.models"),
    "trust_fast.evaluation": ("trust_fast.cli",),
    "trust_fast.world": ("trust_fast.cli", "trust_fast.engine"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    bad = sorted((m, t) for m in MODULES if _under(m, layer) for t in _imports(m, top_level_only=False)
                 if any(_under(t, f) for f in FORBIDDEN[layer]))
    assert not bad, f"{layer} may not import {FORBIDDEN[layer]}: {bad}"


def test_models_import_the_world_only_when_called():
    bad = sorted((m, t) for m in MODULES if _under(m, "trust_fast.models") for t in _imports(m, top_level_only=True)
                 if _under(t, "trust_fast.world"))
    assert not bad, bad


def test_there_is_no_import_circle():
    """No cycle among the imports run at import time (a package importing its own submodules is
    not one: importing a submodule runs its package first, not the other way round)."""
    graph = {m: {t for t in _imports(m, top_level_only=True) if not _under(m, t)} for m in MODULES}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_no_module_is_over_500_lines_and_no_function_over_80():
    long_modules = {m: n for m, p in MODULES.items() if (n := sum(1 for _ in open(p))) > 500}
    long_functions = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(open(p).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append((m, node.name, node.end_lineno - node.lineno + 1))
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_every_import_of_the_package_names_a_module_that_exists():
    """A relative import that misses its level (``from .localize`` in optim/ for ``..localize``)
    fails only when its line runs; every ``trust_fast`` module named anywhere must exist."""
    missing = []
    for name, path in MODULES.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("trust_fast")):
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                if base not in MODULES:
                    missing.append((name, node.lineno, base))
    assert not missing, missing


def test_the_checker_sees_imports_it_must_forbid():
    """The import walk finds relative, absolute and lazy imports (a walk that found none would pass
    every rule above)."""
    assert "trust_fast.engine.update" in _imports("trust_fast.engine.unlearner", top_level_only=True)
    assert "trust_fast.checkpoint" in _imports("trust_fast.engine.run", top_level_only=False)
    assert "trust_fast.checkpoint" not in _imports("trust_fast.engine.run", top_level_only=True)

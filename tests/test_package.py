"""The package's shape: every public name imports, and imports only go down the pipeline (no cycles).

Layers, lowest first (docs: README "Layout"): kernels -> data -> models -> pseudo_labels -> losses ->
{official, analysis, evaluation, integrations} -> engine -> stage2. A module may import from its own layer or
any lower one; the import graph between packages has no cycle. Function-local imports count too.
"""
import ast
import os
from collections import defaultdict

import pytest

import aream_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = {"kernels": 0, "data": 1, "models": 2, "pseudo_labels": 3, "losses": 4, "official": 5, "analysis": 5,
        "evaluation": 5, "integrations": 5, "engine": 6, "stage2": 7}


def _package_files():
    """(package of the file, path) for every module of aream_fast (kernels/ is aream_fast.kernels)."""
    for folder, package_of in ((os.path.join(REPO, "aream_fast"), None), (os.path.join(REPO, "kernels"), "kernels")):
        for root, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, folder).split(os.sep)
                package = package_of or (rel[0] if len(rel) > 1 else None)
                yield package, path


def _imported_packages(path):
    """aream_fast sub-packages a file imports (absolute and relative, module level and function local)."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                continue  # relative imports stay inside their package
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "aream_fast" and len(parts) > 1:
                yield parts[1], node.lineno


def test_every_public_name_imports():
    for name in aream_fast.__all__:
        if name != "__version__":
            assert getattr(aream_fast, name) is not None, name
    import aream_fast.stage2 as stage2

    for name in stage2.__all__:
        assert getattr(stage2, name) is not None, name


def test_every_subpackage_has_a_rank():
    packages = {p for p, _ in _package_files() if p is not None}
    assert packages <= set(RANK), sorted(packages - set(RANK))


def test_imports_only_go_down_and_have_no_cycle():
    upward = []
    edges = defaultdict(set)
    for package, path in _package_files():
        if package is None:
            continue  # aream_fast/__init__.py: the lazy public table names modules as strings
        for target, line in _imported_packages(path):
            if target not in RANK:
                continue
            if target != package:
                edges[package].add(target)
            if RANK[target] > RANK[package]:
                upward.append(f"{os.path.relpath(path, REPO)}:{line} ({package}) imports aream_fast.{target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)
    # no cycle between packages (same-layer packages may import each other, but not both ways round)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in list(edges):
        if node not in state:
            visit(node, [])


def test_the_test_can_fail(tmp_path, monkeypatch):
    """An upward edge in a file is found (the walker is not vacuous)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from aream_fast.engine import trainer\n")
    assert list(_imported_packages(str(bad))) == [("engine", 2)]


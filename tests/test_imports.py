"""The package's import graph: no cycles (module-level or deferred imports), and argparse only in
the CLI (nothing below it takes parsed flags)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "larv_jax"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside a function.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. A
    module's edge to its own parent package (initialised before it by Python) counts only when it
    imports a name defined there, not one of its submodules."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, file in mods.items():
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [(a.name, True) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [(f"{node.module}.{a.name}", True) if f"{node.module}.{a.name}" in mods
                           else (node.module, False) for a in node.names]
            else:
                continue
            for target, is_module in targets:
                ancestor = name.startswith(target + ".")
                if target in mods and target != name and not (ancestor and is_module):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "larv_jax.larv.plan" in graph["larv_jax.cli.merge"]
    assert cycles(graph) == []


def test_the_check_finds_a_cycle(tmp_path):
    """Two modules that import each other inside functions (what larv/mergers.py and
    larv/veneer.py once did), and a submodule importing a name from its package's __init__."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("def g():\n    from pkg.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import X\nY = 1\n")
    (pkg / "sub" / "c.py").write_text("X = 0\ndef h():\n    from pkg.sub import Y\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.c"]]


@pytest.mark.parametrize("banned", ["argparse"])
def test_flags_stay_in_the_cli(banned):
    users = sorted(name for name, targets in _stdlib_imports(PACKAGE).items()
                   if banned in targets and not name.startswith("larv_jax.cli"))
    assert users == []


def _stdlib_imports(root: Path) -> dict[str, set[str]]:
    out = {}
    for name, file in _modules(root).items():
        tree = ast.parse(file.read_text(), str(file))
        out[name] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
        out[name] |= {n.module.split(".")[0] for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom) and n.module}
    return out

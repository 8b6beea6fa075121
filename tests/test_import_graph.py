"""The project's module import graph, read from the source with ``ast``: no cycles.

Every ``import`` and ``from ... import`` counts, absolute or relative, at module
level or inside a function (a lazy import only postpones a cycle); imports under
``if TYPE_CHECKING:`` never run and are skipped. ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module of the project, else to ``pkg``.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("disagg", "router", "transport", "prefill_node", "decode_node")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``packages``."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """The Import / ImportFrom nodes that run (anywhere but under ``if TYPE_CHECKING``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` (source ``path``) imports."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        for target in targets:
            while target and target not in modules:     # `import a.b.c` of a non-module tail
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """``{module: the project modules it imports}``."""
    modules = module_files(root, packages)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (``[a, b, ..., a]``, ``a`` imports ``b``); each one found is broken
    at one edge and the search repeated, so every strongly connected tangle shows."""
    g = {k: set(v) for k, v in graph.items()}
    cycles = []
    while True:
        try:
            graphlib.TopologicalSorter(g).prepare()
            return cycles
        except graphlib.CycleError as exc:
            body = exc.args[1][:0:-1]           # graphlib lists importee before importer
        start = body.index(min(body))
        body = body[start:] + body[:start]
        cycles.append(body + body[:1])
        g[body[0]].discard(body[1])


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (a -> b means a imports b):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_nothing_imports_the_cli():
    """``disagg.cli`` is the top-level dispatcher: it imports the commands, never the reverse."""
    importers = sorted(m for m, deps in import_graph().items() if "disagg.cli" in deps)
    assert not importers, f"modules importing disagg.cli: {importers}"


def test_graph_sees_every_kind_of_import(tmp_path):
    """Absolute, relative, function-level and ``from pkg import submodule`` imports
    make edges; ``TYPE_CHECKING`` ones do not; a cycle through them is reported."""
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "a.py").write_text("import os\nfrom pk.b import thing\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    import pk.a\n\ndef f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")
    graph = import_graph(tmp_path, ("pk",))
    assert graph == {"pk": set(), "pk.a": {"pk.b"}, "pk.b": {"pk.sub.c"},
                     "pk.sub": {"pk.sub.c"}, "pk.sub.c": {"pk.a"}}
    assert find_cycles(graph) == [["pk.a", "pk.b", "pk.sub.c", "pk.a"]]
    graph["pk.b"] = set()
    assert find_cycles(graph) == []


def test_graph_reads_this_project():
    """The walk finds the project's modules and known edges (so an empty graph cannot pass)."""
    graph = import_graph()
    assert {"disagg.cli", "disagg.serve", "router.launch", "transport.base"} <= graph.keys()
    assert "disagg.cluster" in graph["disagg.serve"]
    assert "router.route_types" in graph["router.policy"]       # a relative import

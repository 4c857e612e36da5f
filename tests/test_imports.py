"""Every import points down: no cycles among ``pipeline/`` and ``jobs/`` modules, and no module
imports one in a higher layer of ``LAYERS``.

The graph is read with ``ast`` from the source, so it sees what a reader sees: imports inside
functions count (they run, just later); imports under ``if TYPE_CHECKING:`` do not (they never
run, they only name a type). Importing ``a.b.c`` also runs the packages ``a.b`` and ``a``, so
those count as well, except the importer's own parent packages (already being imported).

The layers, from the code: 0 holds what every stage shares and which imports nothing of the
pipeline's own above it (logging, configuration, storage layouts, positions, Recall@N, images,
datasets); 1 the pure-PyTorch models; 2 what turns models and descriptors into runnable things
(weights, the Ray cluster, the index); 3 the stages, which may use each other's readers; 4
``r2f run``, which chains the stages, and ``r2f serve``, which answers one photo with them; 5 the command line over all of them; 6 the ``jobs/``
entrypoints over the command line's stages. ``R2F_IMPORTS_ROOT`` points the test at another
checkout (e.g. a ``git worktree`` of an older commit).
"""
from __future__ import annotations

import ast
import fnmatch
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("R2F_IMPORTS_ROOT") or Path(__file__).resolve().parents[1])
PACKAGES = ("pipeline", "jobs")

LAYERS: list[tuple[str, ...]] = [
    ("pipeline", "pipeline.log", "pipeline.timefmt", "pipeline.config", "pipeline.storage", "pipeline.cas",
     "pipeline.device", "pipeline.spatial", "pipeline.metrics", "pipeline.datasets", "pipeline.images",
     "pipeline.augment", "pipeline.benchmarks", "pipeline.ransac"),
    ("pipeline.model", "pipeline.model.*"),
    ("pipeline.weights", "pipeline.cluster", "pipeline.index", "pipeline.index.*"),
    ("pipeline.extract", "pipeline.extract_actors", "pipeline.rerank", "pipeline.rerank.*", "pipeline.evaluate",
     "pipeline.report", "pipeline.mine", "pipeline.mine.*", "pipeline.reindex", "pipeline.reindex.*",
     "pipeline.train", "pipeline.train.*"),
    ("pipeline.run", "pipeline.serve", "pipeline.serve.*"),
    ("pipeline.cli",),
    ("jobs", "jobs.*"),
]


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the packages."""
    mods = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its body (see the module docstring)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:  # `from pkg import sub` imports the submodule when there is one
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module)
        else:
            visit(node)

    visit(ast.parse(path.read_text(), filename=str(path)))
    own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    deps = set()
    for dep in found:
        parts = dep.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a and a.b first
            d = ".".join(parts[:i])
            if d in mods and d != name and d not in own_parents:
                deps.add(d)
    return deps


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = find_modules(root)
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module
    (Tarjan's algorithm, iterative); [] when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))
    return [_cycle_in(graph, set(c)) for c in components]


def describe_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle, with every module of its strongly connected component (all of them must change)."""
    out = []
    for cycle in find_cycles(graph):
        comp = sorted({m for m in graph if m in _component_of(graph, cycle[0])})
        out.append(" -> ".join(cycle) + (f"   (component: {', '.join(comp)})" if len(comp) > len(set(cycle)) else ""))
    return out


def _component_of(graph: dict[str, set[str]], node: str) -> set[str]:
    def reach(start: str, edges) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for d in edges(todo.pop()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    reverse: dict[str, set[str]] = {}
    for a, ds in graph.items():
        for d in ds:
            reverse.setdefault(d, set()).add(a)
    return reach(node, lambda n: graph.get(n, ())) & reach(node, lambda n: reverse.get(n, ()))


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A closed path through ``comp`` (a strongly connected component), by breadth-first search
    from its first module back to itself."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & comp):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return sorted(comp)


def layer_of(module: str) -> int | None:
    for i, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for name in sorted(graph):
        for dep in sorted(graph[name]):
            if layer_of(dep) > layer_of(name):
                out.append(f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})")
    return out


# ---------------------------------------------------------------- the tree
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_every_module_has_a_layer(graph):
    missing = sorted(m for m in graph if layer_of(m) is None)
    assert not missing, f"modules in no layer of LAYERS (place them): {missing}"


def test_no_import_cycles(graph):
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + c for c in cycles)


def test_every_import_points_down(graph):
    assert all(layer_of(m) is not None for m in graph), "see test_every_module_has_a_layer"
    up = upward_imports(graph)
    assert not up, "imports that point up a layer:\n" + "\n".join("  " + u for u in up)


def test_the_graph_is_read_as_python_runs_it(graph):
    """Function-level imports count, TYPE_CHECKING ones do not, and a submodule import also
    reaches its package: checked on modules whose imports are known."""
    if os.environ.get("R2F_IMPORTS_ROOT"):
        pytest.skip("known edges are those of this checkout")
    assert "pipeline.report" in graph["pipeline.run"]            # inside run()
    assert "pipeline.index.published" not in graph["pipeline.index.leases"]  # under TYPE_CHECKING
    assert {"pipeline.index", "pipeline.index.search"} <= graph["pipeline.mine"]
    assert "pipeline.index" not in graph["pipeline.index.search"]  # its own package


# ---------------------------------------------------------------- the checker itself
def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_reports_a_cycle_through_a_function_import_and_an_upward_import(tmp_path):
    _tree(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/log.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import run\n",
        "pipeline/storage.py": "def f():\n    from .run import main\n",
        "pipeline/run.py": "from pipeline import storage\n",
        "jobs/__init__.py": "",
    })
    g = import_graph(tmp_path)
    assert g["pipeline.log"] == set()  # its only import is under TYPE_CHECKING
    assert find_cycles(g) == [["pipeline.run", "pipeline.storage", "pipeline.run"]]
    assert upward_imports(g) == ["pipeline.storage (layer 0) imports pipeline.run (layer 4)"]

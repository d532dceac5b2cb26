"""The package's import graph: no circles, and the daemon's layers import downwards only.

Every `import` statement counts, the ones inside functions and under TYPE_CHECKING too: a
lazy import that closes a circle is still a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvd

ROOT = Path(kvd.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The kvd module `name` lives in (a name imported from a module resolves to that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.split(".")[0] == "kvd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] == "kvd":
                found |= {_resolve(f"{base}.{a.name}") for a in node.names}
    found.discard(None)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_known_edges():
    assert "kvd.daemon.serving" in GRAPH["kvd.daemon.main"]
    assert "kvd.daemon.supervisor" in GRAPH["kvd.daemon.serving"]
    assert "kvd.messages" in GRAPH["kvd.daemon.supervisor"]


def test_no_import_circle():
    assert cycles() == []


def _reaches(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in GRAPH[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_daemon_layers_import_downwards():
    """main → {frontend, http, pd} → serving → supervisor → ipc/messages."""
    daemon = {m for m in MODULES if m.startswith("kvd.daemon.")}
    pd = {m for m in daemon if m.startswith("kvd.daemon.pd")}
    above = {
        "kvd.daemon.supervisor": {"kvd.daemon.serving", "kvd.daemon.frontend", "kvd.daemon.main", *pd},
        "kvd.daemon.serving": {"kvd.daemon.frontend", "kvd.daemon.main", *pd},
        "kvd.daemon.frontend": {"kvd.daemon.main", "kvd.daemon.http", *pd},
        "kvd.daemon.http": {"kvd.daemon.main", "kvd.daemon.frontend", *pd},
        **{m: {"kvd.daemon.main", "kvd.daemon.frontend", "kvd.daemon.http"} for m in pd},
    }
    for module, forbidden in above.items():
        assert not (_reaches(module) & forbidden), f"{module} imports upwards: {_reaches(module) & forbidden}"
    importers_of_main = {m for m, deps in GRAPH.items() if "kvd.daemon.main" in deps}
    assert importers_of_main <= {"kvd.cli"}, importers_of_main


def test_engine_imports_only_scheduler_cache_and_leaves():
    deps = GRAPH["kvd.engine.engine"]
    assert not {d for d in deps if d.startswith(("kvd.worker", "kvd.daemon", "kvd.messages", "kvd.llm"))}, deps
    tree = ast.parse(MODULES["kvd.engine.engine"].read_text())
    lazy = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
            if isinstance(n, (ast.Import, ast.ImportFrom))]  # fmt: skip
    assert not lazy, "kvd.engine.engine imports inside a function"


def test_model_info_is_a_leaf():
    assert GRAPH["kvd.model_info"] == set()

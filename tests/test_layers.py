"""The layer check: imports go downward only and no module imports itself in a cycle.

Every `import` counts, including those inside functions: a deferred import hides a cycle
from Python, not from the design. The layers are those of docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "batchlab"

# Lowest first. A module may import its own layer or any layer below it. A top-level module
# (batchlab/x.py) or a package (batchlab/x/) is named by x.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        "errors results core",
        "data task history target",
        "tasks",
        "callbacks step recorder",
        "tracking",
        "loop train",
        "measure",
        "adaptive",
        "planner",
        "sweep",
        "report",
        "integrations",
        "cli __main__",
        "__init__",
    )
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str | None = None) -> set[str]:
    """Every batchlab module `path` (module `name`) imports, absolute or relative, at any depth."""
    name = name or _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "batchlab" or t.startswith("batchlab."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, layer in enumerate(LAYERS):
        if key in layer:
            return index
    raise AssertionError(f"{module}: no layer in tests/test_layers.py; add {key!r} to one")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_package_init_edge(importer: str, imported: str) -> bool:
    # A package's __init__ re-exporting its own submodules is not a cycle of ideas, but a
    # submodule importing its package's __init__ is (it pulls in its siblings).
    return imported.startswith(importer + ".")


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer(module)


def test_imports_go_downward_only() -> None:
    upward = [
        f"{importer} (layer {_layer(importer)}) imports {imported} (layer {_layer(imported)})"
        for importer, targets in sorted(_graph().items())
        for imported in sorted(targets)
        if _layer(imported) > _layer(importer)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = _graph()
    pruned = {
        importer: {t for t in targets if not _is_package_init_edge(importer, t)}
        for importer, targets in graph.items()
    }
    cycles = _cycles(pruned)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder_on_known_graphs(edges: dict[str, set[str]], expected: list) -> None:
    assert _cycles(defaultdict(set, edges)) == expected


def test_import_finder_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    # The checker must count an import inside a function; otherwise it misses the cycles
    # the old code hid that way.
    source = tmp_path / "probe.py"
    source.write_text(
        "import os\n"
        "def f():\n"
        "    from batchlab.train import train\n"
        "from . import state\n"
        "from ..task import Task\n"
    )
    assert _imports(source, "batchlab.measure.probe") == {
        "batchlab.train",
        "batchlab.train.train",
        "batchlab.measure",
        "batchlab.measure.state",
        "batchlab.task",
        "batchlab.task.Task",
    }

"""The import graph of the ``pyserval`` package: no cycles, and no layer imports upward.

The graph is read from the source with ``ast`` (nothing is imported): one node per module,
one edge per ``import``/``from ... import`` that names a ``pyserval`` module, including
imports inside functions (a lazy import is still a dependency, only a hidden one). Imports
under ``if TYPE_CHECKING:`` are kept apart: they never run, so they cannot make an import
cycle, but a cycle through them is reported (``python tests/test_import_graph.py``).

The layers, lowest first: naming (and tools, the pcap writer every layer may use) -> sal ->
transport -> core (and testing, the simulated network) -> runtime -> control, translator,
http, metrics, launch -> cli -> the package root. A module may import its own layer or a
lower one, never a higher one.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "pyserval"

# The subpackage (first component under pyserval) -> its layer; higher may import lower.
LAYERS: dict[str, int] = {
    # errors and config import nothing of pyserval: every layer may use them.
    "errors": -1,
    "config": -1,
    "naming": 0,
    "tools": 1,  # pcap writing: uses the SAL's Address
    "data": 0,
    "sal": 1,
    "transport": 2,
    "core": 3,
    "testing": 3,
    "runtime": 4,
    "control": 5,
    "translator": 5,
    "http": 5,
    "metrics": 5,
    "launch": 5,
    "": 6,  # pyserval/__init__.py: the public names of every layer below
    "cli": 7,
    "__main__": 8,
}

# Cycles closed only by an import inside a function, each with why it stays. The test fails
# when one of them is no longer deferred or no longer there (then remove it here).
ALLOWED_DEFERRED: dict[tuple[str, str], str] = {
    ("pyserval.runtime.socket", "pyserval.runtime.api"): (
        "ServalSocket() without a host uses the process-wide default Host, and Host.socket() "
        "makes ServalSockets: two constructors that name each other"
    ),
}


@dataclass
class Graph:
    """Modules and their imports: ``runtime`` edges run at import or call time,
    ``typing`` edges only under ``TYPE_CHECKING``."""

    modules: set[str] = field(default_factory=set)
    runtime: dict[str, set[str]] = field(default_factory=dict)
    typing: dict[str, set[str]] = field(default_factory=dict)
    # The runtime edges made only by imports inside functions (run at the first call).
    deferred: dict[str, set[str]] = field(default_factory=dict)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


Found = tuple[ast.Import | ast.ImportFrom, bool, bool]


def _imports(tree: ast.AST) -> Iterator[Found]:
    """Every import statement in ``tree``, whether it sits under ``if TYPE_CHECKING:``, and
    whether it sits inside a function."""

    def walk(node: ast.AST, typing_only: bool, deferred: bool) -> Iterator[Found]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, typing_only, deferred
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), True, deferred)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), typing_only, deferred)
            else:
                inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(child, typing_only, deferred or inner)

    yield from walk(tree, False, False)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> set[str]:
    """The pyserval modules an import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        # ``from pkg import name``: pkg.name when that is a module, else pkg (where the
        # name is defined). A package's ``__init__`` runs before any of its modules, as a
        # parent package always does: that is not counted as a dependency on it.
        subs = [f"{stem}.{alias.name}" for alias in node.names]
        names = [sub for sub in subs if sub in known]
        if len(names) < len(subs):
            names.append(stem)
    found = set()
    for name in names:
        # ``import a.b.c`` loads a, a.b and a.b.c; the deepest known one is the dependency.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE):
            found.add(name)
    return found


@functools.cache
def build_graph(root: Path = SRC / PACKAGE) -> Graph:
    """Parse every module under ``root`` and collect its pyserval imports."""
    files = {_module_name(p): p for p in sorted(root.rglob("*.py"))}
    graph = Graph(modules=set(files))
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        runtime: set[str] = set()
        typing_only: set[str] = set()
        at_import: set[str] = set()
        for node, under_type_checking, in_function in _imports(tree):
            targets = _targets(node, module, is_package, graph.modules) - {module}
            (typing_only if under_type_checking else runtime).update(targets)
            if not under_type_checking and not in_function:
                at_import.update(targets)
        graph.runtime[module] = runtime
        graph.typing[module] = typing_only - runtime
        graph.deferred[module] = runtime - at_import
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)


def layer(module: str) -> int:
    """The layer of ``pyserval.X...`` (by X); unknown subpackages fail the test."""
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every import of a higher layer by a lower one."""
    return sorted(
        (src, dst) for src, dsts in edges.items() for dst in dsts if layer(dst) > layer(src)
    )


def _merged(graph: Graph) -> dict[str, set[str]]:
    return {m: graph.runtime.get(m, set()) | graph.typing.get(m, set()) for m in graph.modules}


# -- the tests ----------------------------------------------------------------------------


def test_the_graph_sees_known_edges() -> None:
    # Guards the parser itself: edges we know exist (runtime and TYPE_CHECKING-only).
    graph = build_graph()
    assert "pyserval.runtime.driver" in graph.runtime["pyserval.runtime.host"]
    assert "pyserval.core.host" in graph.runtime["pyserval.runtime.driver"]
    assert "pyserval.control.router" in graph.typing["pyserval.metrics"]
    assert "pyserval.control" in graph.runtime["pyserval"]
    assert "pyserval.runtime.api" in graph.deferred["pyserval.runtime.socket"]
    assert "pyserval.runtime.host" in graph.typing["pyserval.runtime.socket"]
    # ``from . import cli_module`` is an edge to the module, not to the package.
    assert "pyserval.cli.router" in graph.runtime["pyserval.cli"]
    assert "pyserval.cli" not in graph.runtime["pyserval.cli.router"]


def test_every_subpackage_has_a_layer() -> None:
    graph = build_graph()
    unknown = sorted(
        {m for m in graph.modules if m.split(".")[1:2] and m.split(".")[1] not in LAYERS}
    )
    assert unknown == []


def _without_allowed(graph: Graph) -> dict[str, set[str]]:
    return {
        src: {dst for dst in dsts if (src, dst) not in ALLOWED_DEFERRED}
        for src, dsts in graph.runtime.items()
    }


def test_no_import_cycles() -> None:
    assert find_cycles(_without_allowed(build_graph())) == []


def test_the_allowed_deferred_imports_are_deferred_and_still_close_a_cycle() -> None:
    graph = build_graph()
    for src, dst in ALLOWED_DEFERRED:
        assert dst in graph.deferred[src], f"{src} -> {dst} is no longer a deferred import"
        edges = _without_allowed(graph)
        edges[src] = edges[src] | {dst}
        assert any(src in c and dst in c for c in find_cycles(edges)), f"{src} -> {dst}"


def test_no_layer_imports_a_higher_one() -> None:
    assert upward_imports(build_graph().runtime) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def main() -> int:
    """Print the graph's cycles (runtime and with TYPE_CHECKING imports) and upward imports."""
    graph = build_graph()
    edges = sum(len(v) for v in graph.runtime.values())
    typing_edges = sum(len(v) for v in graph.typing.values())
    print(
        f"{len(graph.modules)} modules, {edges} runtime imports, {typing_edges} TYPE_CHECKING-only"
    )
    for title, found in (
        ("runtime cycles", find_cycles(graph.runtime)),
        (
            "runtime cycles without the allowed deferred imports",
            find_cycles(_without_allowed(graph)),
        ),
        ("cycles counting TYPE_CHECKING imports", find_cycles(_merged(graph))),
    ):
        print(f"{title}: {len(found)}")
        for component in found:
            print("  " + " <-> ".join(component))
    for title, found_up in (
        ("upward runtime imports", upward_imports(graph.runtime)),
        ("upward TYPE_CHECKING imports", upward_imports(graph.typing)),
    ):
        print(f"{title}: {len(found_up)}")
        for src, dst in found_up:
            print(f"  {src} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

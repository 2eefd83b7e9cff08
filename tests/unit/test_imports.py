"""No import circles inside ``fileserver/``.

Every module is parsed (not imported), and every import counts: at the top, under
``TYPE_CHECKING`` and inside functions. A module that imports a module that imports it
back (directly or around a longer loop) fails the test, which prints each loop.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fileserver"

Graph = dict[str, set[str]]

# Loops still being removed by other work (issue 15); delete an entry when its loop is
# gone. Nothing else belongs here.
KNOWN: set[tuple[str, ...]] = {
    # storage <-> s3_put: being removed by the storage/backfill refactor
    ("fileserver.s3_put", "fileserver.storage"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``fileserver`` modules ``name`` imports anywhere in its source, with the
    packages Python runs on the way (not ``name``'s own enclosing packages)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if is_package:
        own_packages.add(name)
    out: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own_packages:
                out.add(prefix)
    out.discard(name)
    return out


def import_graph() -> Graph:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(graph: Graph) -> Iterator[tuple[str, ...]]:
    """Every elementary loop once, starting at its smallest module name."""
    for start in sorted(graph):
        stack = [iter(sorted(graph[start]))]
        path = [start]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                path.pop()
            elif child == start:
                yield tuple(path)
            elif child > start and child not in path:
                path.append(child)
                stack.append(iter(sorted(graph[child])))


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "fileserver.pipeline" in graph["fileserver.processor"]  # at the top
    assert "fileserver.runtime" in graph["fileserver.web"]  # under TYPE_CHECKING
    assert "fileserver.devstack.servers" in graph["fileserver.devstack.dev"]  # in a function
    assert {"fileserver.http11", "fileserver.logs"} <= graph["fileserver.runtime"] | graph[
        "fileserver.cli"
    ]  # from fileserver import <module>


def test_cycles_are_found() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert sorted(cycles(graph)) == [("a", "b"), ("a", "b", "c")]


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    found = sorted(set(cycles(import_graph())))
    for loop in found:
        print(" -> ".join((*loop, loop[0])), "(known)" if loop in KNOWN else "")
    assert [loop for loop in found if loop not in KNOWN] == []

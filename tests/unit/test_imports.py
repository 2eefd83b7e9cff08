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

# Loops still being removed by other work; delete an entry when its loop is gone.
# Nothing else belongs here (empty since the storage package broke storage <-> s3_put).
KNOWN: set[tuple[str, ...]] = set()


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


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


def import_graph(package: Path = PACKAGE) -> Graph:
    found = modules(package)
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


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "top.py": "import os\nimport pkg.plain\nfrom pkg.sub.deep import x\n",
        "typing_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from pkg.plain import y\n",
        "late.py": "def f():\n    from pkg import plain, top\n",
        "plain.py": "",
        "sub/__init__.py": "from . import deep\n",
        "sub/deep.py": "from .. import plain\nfrom .sibling import z\n",
        "sub/sibling.py": "",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    assert import_graph(pkg) == {
        "pkg": set(),
        "pkg.top": {"pkg.plain", "pkg.sub", "pkg.sub.deep"},  # with the package it runs
        "pkg.typing_only": {"pkg.plain"},
        "pkg.late": {"pkg.plain", "pkg.top"},
        "pkg.plain": set(),
        "pkg.sub": {"pkg.sub.deep"},
        "pkg.sub.deep": {"pkg.plain", "pkg.sub.sibling"},
        "pkg.sub.sibling": set(),
    }
    graph = import_graph()
    assert "fileserver.metrics" in graph["fileserver.pipeline"]
    assert "fileserver.pipeline" not in graph["fileserver.metrics"]


def test_cycles_are_found() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert sorted(cycles(graph)) == [("a", "b"), ("a", "b", "c")]


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    found = sorted(set(cycles(import_graph())))
    for loop in found:
        print(" -> ".join((*loop, loop[0])), "(known)" if loop in KNOWN else "")
    assert [loop for loop in found if loop not in KNOWN] == []

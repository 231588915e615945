"""Measures the package layout keeps (issue 20.5): short functions and files, no `launch` import
below it, no import cycles among the project's modules. Each checker is also run on a small
synthetic tree under tmp_path, so each check is shown able to fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fssdp", "collectives", "models", "launch")
BELOW_LAUNCH = ("fssdp", "collectives", "models")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450


def _files(root: Path, packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))


def _module(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def long_functions(root: Path, packages: tuple[str, ...], limit: int) -> list[str]:
    """`path:line name (n lines)` for every function or method longer than `limit` lines."""
    out = []
    for path in _files(root, packages):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


def long_files(root: Path, packages: tuple[str, ...], limit: int) -> list[str]:
    out = []
    for path in _files(root, packages):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)} ({n} lines)")
    return out


def _runtime_imports(tree: ast.Module, module: str, is_pkg: bool) -> list[str]:
    """Absolute names of every import (top level and inside functions), except those under
    `if TYPE_CHECKING:`, which never run."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names.extend(f"{base}.{a.name}" for a in node.names)  # X.Y when Y is a module
            names.append(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports (by `import a.b` or `from a.b import c`)."""
    paths = {_module(root, p): p for p in _files(root, packages)}
    graph: dict[str, set[str]] = {}
    for mod, path in paths.items():
        names = _runtime_imports(ast.parse(path.read_text()), mod, path.name == "__init__.py")
        graph[mod] = {n for n in names if n in paths and n != mod}
    # `from pkg import sub` names both pkg.sub (a module) and pkg: keep pkg only when nothing
    # more precise was named under it (a package's __init__ is not a dependency of its own use).
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if not any(o.startswith(d + ".") for o in deps)}
    return graph


def import_launch(root: Path, packages: tuple[str, ...]) -> list[str]:
    out = []
    for path in _files(root, packages):
        mod = _module(root, path)
        for name in _runtime_imports(ast.parse(path.read_text()), mod, path.name == "__init__.py"):
            if name.split(".")[0] == "launch":
                out.append(f"{path.relative_to(root)} imports {name}")
    return sorted(set(out))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per import cycle found by depth-first search: [a, b, …, a]."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                dfs(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            dfs(mod)
    return found


# -- the measures on this repository ------------------------------------------------------------


def test_no_function_over_80_lines() -> None:
    assert long_functions(ROOT, PACKAGES, MAX_FUNCTION_LINES) == []


def test_no_file_over_450_lines() -> None:
    assert long_files(ROOT, PACKAGES, MAX_FILE_LINES) == []


def test_no_launch_import_below_launch() -> None:
    assert import_launch(ROOT, BELOW_LAUNCH) == []


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert "fssdp.strategies.base" in graph["fssdp.strategies.fssdp"]  # the graph is built
    assert [" -> ".join(c) for c in cycles(graph)] == []


# -- each checker fails on a tree that breaks it ------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checkers_fail_on_a_synthetic_tree(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    root = _tree(
        tmp_path,
        {
            "core/__init__.py": "",
            "core/a.py": "from core import b\n\n\ndef f():\n" + body,  # 81 lines
            "core/b.py": "def g():\n    from core.c import h\n",
            "core/c.py": "from . import a\nimport launch.x\n" + "\n" * 449,  # 451 lines
            "core/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import core.a\n",
            "launch/__init__.py": "",
            "launch/x.py": "",
        },
    )
    pkgs = ("core", "launch")
    assert long_functions(root, pkgs, 80) == ["core/a.py:4 f (81 lines)"]
    assert long_functions(root, pkgs, 81) == []
    assert long_files(root, pkgs, 450) == ["core/c.py (451 lines)"]
    assert import_launch(root, ("core",)) == ["core/c.py imports launch.x"]
    graph = import_graph(root, pkgs)
    assert graph["core.d"] == set()  # TYPE_CHECKING imports never run
    assert graph["core.b"] == {"core.c"}  # a function-level import counts
    assert cycles(graph) == [["core.a", "core.b", "core.c", "core.a"]]
    del graph["core.c"]
    assert cycles(graph) == []


@pytest.mark.parametrize("first", PACKAGES)
def test_every_package_is_in_the_graph(first: str) -> None:
    assert any(m == first or m.startswith(first + ".") for m in import_graph(ROOT, PACKAGES))

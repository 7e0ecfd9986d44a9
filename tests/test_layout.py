"""The package's shape: no import cycles, no private names imported across modules, no argparse in the library.

The import graph is read from the source with :mod:`ast` (nothing is imported): every ``import semmim.x``
and ``from semmim.x import y`` / ``from .x import y`` counts, at module level and inside functions
alike, since a function-level import only delays a cycle to the first call. ``from pkg import name``
where ``pkg/__init__.py`` re-exports ``name`` from a submodule is an edge to that submodule (where the
name lives), and an edge from a package's ``__init__`` to one of its own submodules is left out: the
package imports its parts, and a cycle through the ``__init__`` shows up as a part importing back a
name defined by the ``__init__`` itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "semmim"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module


def read_modules(src: Path, package: str) -> dict[str, Module]:
    """Every module under ``src/package`` by dotted name (a package by its own name, not ``.__init__``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        out[name] = Module(name, path, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def import_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.name.split(".")
    if not module.is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _reexports(modules: Mapping[str, Module]) -> dict[str, dict[str, str]]:
    """For each package: {name: module it imports that name from} (module-level ``from`` imports)."""
    out: dict[str, dict[str, str]] = {}
    for m in modules.values():
        if m.is_package:
            out[m.name] = {
                alias.asname or alias.name: import_base(m, node)
                for node in m.tree.body
                if isinstance(node, ast.ImportFrom)
                for alias in node.names
            }
    return out


def _owner(name: str, modules: Mapping[str, Module]) -> str | None:
    """The longest known module that ``name`` (a dotted module or ``module.attribute``) lies in."""
    while name not in modules:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def import_edges(modules: Mapping[str, Module], package: str) -> dict[str, dict[str, int]]:
    """{importer: {imported module: first line}} over every import statement of ``package`` modules."""
    reexports = _reexports(modules)
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m in modules.values():
        for node in ast.walk(m.tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = import_base(m, node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:  # a submodule
                        targets.append(f"{base}.{alias.name}")
                        continue
                    where, seen = base, set()
                    while alias.name in reexports.get(where, {}) and where not in seen:  # follow re-exports
                        seen.add(where)
                        where = reexports[where][alias.name]
                    targets.append(where)
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                owner = _owner(target, modules)
                if owner is None or owner == m.name:
                    continue
                if m.is_package and owner.startswith(m.name + "."):  # a package importing its own parts
                    continue
                edges[m.name].setdefault(owner, node.lineno)
    return edges


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def describe_cycles(cycles: list[list[str]], edges: Mapping[str, Mapping[str, int]]) -> str:
    lines = []
    for component in cycles:
        members = set(component)
        lines.append(" <-> ".join(component))
        for m in component:
            lines += [f"    {m} -> {t} (line {ln})" for t, ln in sorted(edges[m].items()) if t in members]
    return "\n".join(lines)


def private_imports(modules: Mapping[str, Module], package: str) -> list[str]:
    """``from semmim.x import _y`` and ``semmim_module._y`` across modules: "importer:line: name (from module)"."""
    found = []
    for m in modules.values():
        module_aliases: dict[str, str] = {}  # local name -> semmim module it is bound to
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name.startswith(package + "."):
                        module_aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = import_base(m, node)
                if base != package and not base.startswith(package + "."):
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        module_aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                    elif _is_private(alias.name) and base != m.name:
                        found.append(f"{m.name}:{node.lineno}: {alias.name} (from {base})")
        for node in ast.walk(m.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases
                and _is_private(node.attr)
                and module_aliases[node.value.id] != m.name
            ):
                found.append(f"{m.name}:{node.lineno}: {node.attr} (from {module_aliases[node.value.id]})")
    return sorted(found)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# --------------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return read_modules(SRC, PACKAGE)


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    edges = import_edges(modules, PACKAGE)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles (break them with a neutral module):\n" + describe_cycles(cycles, edges)


def test_no_private_names_imported_across_modules(modules: dict[str, Module]) -> None:
    found = private_imports(modules, PACKAGE)
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_the_data_library_has_no_command_line(modules: dict[str, Module]) -> None:
    """argparse lives in :mod:`semmim.cli`; ``semmim.data`` is a library."""
    offenders = [
        m.name
        for m in modules.values()
        if m.name == f"{PACKAGE}.data" or m.name.startswith(f"{PACKAGE}.data.")
        for node in ast.walk(m.tree)
        if (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names))
        or (isinstance(node, ast.ImportFrom) and node.module == "argparse")
    ]
    assert not offenders


def test_one_module_per_eval_protocol(modules: dict[str, Module]) -> None:
    """Each ``*_eval`` protocol function is defined in the module named after its protocol."""
    where = {
        node.name: m.name
        for m in modules.values()
        if m.name.startswith(f"{PACKAGE}.eval.")
        for node in m.tree.body
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_eval")
    }
    for protocol in ("knn", "linear", "finetune", "lowshot", "seg", "classify", "zeroshot"):
        assert where.get(f"{protocol}_eval") == f"{PACKAGE}.eval.{protocol}"


# --------------------------------------------------------------------------------------------------
# The checks can fail: synthetic packages
# --------------------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_modules(root, "pkg")


def test_cycle_finder_sees_cycles(tmp_path: Path) -> None:
    mods = _write(
        tmp_path,
        {
            "__init__.py": "from pkg.a import f\n",  # a package importing its parts: allowed
            "a.py": "def f():\n    from .b import g  # function level counts\n",
            "b.py": "import pkg.c\n",
            "c.py": "from pkg import f\n",  # f re-exported by the package, defined in a: c -> a
            "d.py": "import os\n",
            "sub/__init__.py": "from .x import X\n",
            "sub/x.py": "X = 1\n",
            "sub/y.py": "from pkg.sub import X\n",  # re-export followed to sub.x: no cycle
        },
    )
    edges = import_edges(mods, "pkg")
    assert edges["pkg.c"] == {"pkg.a": 1} and edges["pkg.sub.y"] == {"pkg.sub.x": 1}
    assert "pkg.a" not in edges["pkg"]
    assert find_cycles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.a -> pkg.b (line 2)" in describe_cycles(find_cycles(edges), edges)

    mods = _write(
        tmp_path, {"sub/x.py": "from . import VALUE\nX = 1\n", "sub/__init__.py": "VALUE = 1\nimport pkg.sub.x\n"}
    )
    assert ["pkg.sub", "pkg.sub.x"] not in find_cycles(import_edges(mods, "pkg"))  # __init__ -> own part: left out
    mods = _write(
        tmp_path, {"sub/__init__.py": "VALUE = 1\nfrom pkg.d import *\n", "d.py": "from pkg.sub import VALUE\n"}
    )
    assert ["pkg.d", "pkg.sub"] in find_cycles(import_edges(mods, "pkg"))  # a real cycle through an __init__


def test_private_import_check_sees_private_imports(tmp_path: Path) -> None:
    mods = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "def _helper(): ...\ndef use():\n    return _helper()\n",  # within a module: fine
            "b.py": "from pkg.a import _helper\n",
            "c.py": "from pkg import a\nimport pkg.a as alias\n\nalias._helper()\na._helper()\na.use()\n",
            "d.py": "from pkg import __version__\n",  # dunders are not private
        },
    )
    found = private_imports(mods, "pkg")
    assert found == [
        "pkg.b:1: _helper (from pkg.a)",
        "pkg.c:4: _helper (from pkg.a)",
        "pkg.c:5: _helper (from pkg.a)",
    ]

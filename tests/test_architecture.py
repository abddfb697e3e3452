"""The package's shape: no import cycle, small modules, one place that reads a location."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ckptwriter

PKG_DIR = Path(ckptwriter.__file__).parent
# The bound is "about 400 lines"; this is the hard stop.
MAX_LINES = 430


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(PKG_DIR.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in known else mod)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (cycle := visit(m)) is not None:
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    """No module of src/ckptwriter imports, directly or not, a module that imports it back.

    Package ``__init__`` modules that only re-export are left out as importers of the
    top-level package: ``ckptwriter/__init__`` re-exports everything by design.
    """
    graph = _graph()
    graph = {n: {m for m in deps if m != "ckptwriter"} for n, deps in graph.items()}
    assert _find_cycle(graph) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small(name: str) -> None:
    """No module is over about 400 lines."""
    lines = _modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def _scheme_tests(tree: ast.AST) -> list[int]:
    """Lines that test a string for "://" (``in``, ``startswith``, ``split``...)."""

    def has_sep(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) \
            and "://" in node.value

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            has_sep(n) for n in (node.left, *node.comparators)
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in _STR_TESTS and any(has_sep(a) for a in node.args):
            lines.append(node.lineno)
    return lines


_STR_TESTS = {"startswith", "endswith", "split", "partition", "rpartition", "find",
              "index", "removeprefix", "count", "match", "search"}


def test_only_the_location_parser_reads_a_url_scheme() -> None:
    """Nothing but storage/location.py tests a string for "://"."""
    offenders = [
        f"{name}:{line}"
        for name, path in _modules().items() if name != "ckptwriter.storage.location"
        for line in _scheme_tests(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_the_scheme_check_finds_a_scheme_test() -> None:
    """The check above can fail."""
    tree = ast.parse('a = "://" in x\nb = y.startswith("s3://")\nc = f"{s}://{p}"\n')
    assert _scheme_tests(tree) == [1, 2]

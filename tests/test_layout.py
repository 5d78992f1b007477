"""The source tree keeps the shape that makes it readable: no import cycle between modules
(every import counted, those inside functions too), no source file over 800 lines, and a
package root that holds only the public vocabulary. Read from the source with ``ast``:
nothing is imported.

Imports under ``if TYPE_CHECKING:`` are left out: they never run, and they are how a
module names, in an annotation, the class that uses it (a scope names its supervisor).
"""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

REPOSITORY = Path(__file__).resolve().parents[1]

#: Where each installed package's source lives (pyproject's package-dir).
SOURCES = {"governor": REPOSITORY / "governor", "governor.steps": REPOSITORY / "steps",
           "governor.bench": REPOSITORY / "bench"}

MAX_LINES = 800

#: Modules directly in governor/ (``__init__`` and ``__main__`` included): the rest lives in
#: its subpackages.
MAX_ROOT_MODULES = 12


def modules() -> Dict[str, Path]:
    """Every module's dotted name and its file."""
    found = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imported_modules(path: Path, name: str, known: Set[str]) -> Iterator[str]:
    """The modules a module imports anywhere in its body (relative imports resolved).

    ``from package import name`` runs the package's face for a name it exports, and names
    the submodule when ``name`` is one; the faces of the packages above a module are not
    counted, since every import of a submodule runs them.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node.body = []  # read by no one at run time (module docstring)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield submodule
                elif base in known:
                    yield base


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: set(imported_modules(path, name, set(known))) - {name} for name, path in known.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_file_over_800_lines():
    long = {str(path.relative_to(REPOSITORY)): count for path in modules().values()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_package_root_holds_only_the_public_vocabulary():
    root = sorted(path.name for path in SOURCES["governor"].glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root
    packages = [path.name for path in SOURCES["governor"].iterdir() if (path / "__init__.py").exists()]
    assert len(packages) >= 4, packages

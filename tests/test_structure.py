"""The package stays small and acyclic: every module ≤ 400 lines, no import cycle inside a pillar.

An import counts wherever it stands: module level, inside a function, or under
``if TYPE_CHECKING:`` (a type-only cycle still ties the modules together). A pillar is a direct
subpackage of ``gradstats`` (``gradstats.fisher``, ``gradstats.eqprop``, ...) with its own
subpackages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "gradstats"
MODULES = sorted(SOURCE.rglob("*.py"))
PILLARS = sorted(p.name for p in SOURCE.iterdir() if (p / "__init__.py").exists())


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_module_has_at_most_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize("pillar", PILLARS)
def test_no_import_cycle_inside_a_pillar(pillar):
    prefix = f"gradstats.{pillar}"
    modules = {_module_name(p): p for p in MODULES if _module_name(p).startswith(prefix)}
    # a package's __init__ may re-export its children; an edge into a package means its __init__
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # re-exports from a package __init__ do not count as a cycle with its own children
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and m in modules)}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*trail, module])}"
        state[module] = "open"
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])

"""The scaling package stays small and acyclic: every module <= 400 lines, no import cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "gradstats" / "scaling"
MODULES = sorted(PACKAGE.glob("*.py"))


def _imports(path):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        module = node.module if isinstance(node, ast.ImportFrom) else None
        if module and module.startswith("gradstats.scaling."):
            found.add(module.removeprefix("gradstats.scaling."))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_has_at_most_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_no_import_cycle_inside_the_package():
    graph = {p.stem: _imports(p) for p in MODULES}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*trail, module])}"
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])

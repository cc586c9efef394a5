"""The README's Quickstart holds exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert block is not None, "no code block in the Quickstart"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands_demo_then_tests():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert "demo" in commands[0]
    assert "test" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _quickstart_commands()[1] in ci_lines


def _python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", readme, re.S)


def test_readme_has_python_examples():
    assert _python_blocks()


@pytest.mark.parametrize(
    "block", _python_blocks(), ids=lambda b: b.split("import ")[-1].split("\n")[0][:40]
)
def test_readme_python_example_runs(block, tmp_path, monkeypatch):
    """Each ```python block in the README runs as written (in a scratch folder)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})


def test_install_line_lists_the_extras_the_quickstart_installs():
    """The README's dev install and `scripts/dev.py test` install the same extras."""
    dev = (ROOT / "scripts" / "dev.py").read_text()
    match = re.search(r'\{ROOT\}\[([\w,]+)\]"', dev)
    assert match is not None, "scripts/dev.py names no extras"
    extras = match.group(1)
    install = (ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert f'pip install -e ".[{extras}]" -c requirements/constraints.txt' in install
    assert "pip install --no-deps -r requirements/peers.txt" in install


def test_the_demo_duration_is_one_measured_figure():
    figures = set(re.findall(r"\d+ min \d+ s", (ROOT / "README.md").read_text()))
    assert len(figures) == 1, figures


@pytest.mark.parametrize("stale", ["65–90 s", "about 3 minutes", "2.5 minutes", "~2.5 min"])
def test_no_stale_duration_remains(stale):
    assert stale not in (ROOT / "README.md").read_text()

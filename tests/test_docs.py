"""The docs site: its sources stay in step with the README and the package, and the strict build
(what CI runs) fails on a broken link, anchor, cross-reference or snippet."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = [
    "gradstats",
    "gradstats.errors",
    "gradstats.moments",
    "gradstats.scaling",
    "gradstats.fisher",
    "gradstats.eqprop",
    "gradstats.eqprop.models",
    "gradstats.eqprop.train",
    "gradstats.testing",
    "gradstats.integrations",
    "gradstats.bench",
]
SNIPPET = re.compile(r'^--8<-- "(?P<file>[^":]+)(?::(?P<section>[\w-]+))?"$', re.M)


def _pages() -> dict[str, str]:
    return {str(p.relative_to(DOCS)): p.read_text() for p in sorted(DOCS.rglob("*.md"))}


def _snippets() -> list[tuple[str, str, str | None]]:
    return [
        (page, m.group("file"), m.group("section"))
        for page, text in _pages().items()
        for m in SNIPPET.finditer(text)
    ]


def _markers(path: Path) -> list[tuple[str, str]]:
    return re.findall(r"<!-- --8<-- \[(start|end):([\w-]+)\] -->", path.read_text())


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_api_reference_documents_every_public_module(module):
    assert any(re.search(rf"^::: {re.escape(module)}$", t, re.M) for t in _pages().values())


@pytest.mark.parametrize(("page", "file", "section"), _snippets())
def test_every_included_file_and_section_exists(page, file, section):
    assert (ROOT / file).is_file(), f"{page} includes missing {file}"
    if section is not None:
        assert ("start", section) in _markers(ROOT / file), (
            f"{page}: no section {section} in {file}"
        )


def test_readme_sections_open_and_close_in_order():
    open_section = None
    for kind, name in _markers(ROOT / "README.md"):
        if kind == "start":
            assert open_section is None, f"section {name} opens inside {open_section}"
            open_section = name
        else:
            assert open_section == name, f"end:{name} closes {open_section}"
            open_section = None
    assert open_section is None


@pytest.mark.parametrize(
    "section", ["intro", "quickstart", "install", "moments", "eqprop", "fisher", "scaling"]
)
def test_pillar_pages_include_the_readme_instead_of_copying_it(section):
    assert any(f == "README.md" and s == section for _, f, s in _snippets())


def test_ci_lints_type_checks_and_builds_the_docs_after_the_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    order = [
        "python3 scripts/dev.py test",
        '"${GRADSTATS_VENV:-.venv}/bin/ruff" check .',
        '"${GRADSTATS_VENV:-.venv}/bin/ruff" format --check .',
        '"${GRADSTATS_VENV:-.venv}/bin/mypy"',
        '"${GRADSTATS_VENV:-.venv}/bin/mkdocs" build --strict --site-dir site',
    ]
    positions = [lines.index(command) for command in order]
    assert positions == sorted(positions)


@pytest.mark.parametrize("tool", ['/bin/ruff" check', '/bin/ruff" format', '/bin/mypy"'])
def test_pre_commit_runs_the_same_lint_as_ci(tool):
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    entries = [hook["entry"] for repo in config["repos"] for hook in repo["hooks"]]
    assert any(tool in entry for entry in entries)


# --- the strict build, on a one-page site with the real configuration -------------------------

BROKEN_PAGES = {
    "cross-reference": (
        "[a class][gradstats.errors.NoSuchError]\n",
        "gradstats.errors.NoSuchError",
    ),
    "link": ("[a page](no-such-page.md)\n", "no-such-page.md"),
    "anchor": ("[a heading](#no-such-heading)\n", "no-such-heading"),
    "included file": ('--8<-- "NO_SUCH_FILE.md"\n', "NO_SUCH_FILE.md"),
    "README section": ('--8<-- "README.md:no-such-section"\n', "no-such-section"),
}


def _build(tmp_path: Path, page: str) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of mkdocs.yml's configuration with ``page`` as the only page."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Page\n\n" + page)
    config.update(
        docs_dir=str(tmp_path / "docs"), site_dir=str(tmp_path / "site"), nav=["index.md"]
    )
    for ext in config["markdown_extensions"]:
        if isinstance(ext, dict) and "pymdownx.snippets" in ext:
            ext["pymdownx.snippets"]["base_path"] = [str(ROOT)]
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str(ROOT / "src")]
            python["options"]["extensions"] = [
                str(ROOT / e) for e in python["options"].get("extensions", [])
            ]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    # No -q: it drops the warnings before --strict counts them (the build would pass).
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_strict_build_passes_with_a_resolved_cross_reference(tmp_path):
    page = "[the base class][gradstats.errors.GradstatsError]\n\n::: gradstats.errors\n"
    result = _build(tmp_path, page)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'href="#gradstats.errors.GradstatsError"' in (tmp_path / "site/index.html").read_text()


@pytest.mark.parametrize("broken", sorted(BROKEN_PAGES))
def test_strict_build_fails_on_a_broken(tmp_path, broken):
    page, named = BROKEN_PAGES[broken]
    result = _build(tmp_path, "::: gradstats.errors\n\n" + page)
    assert result.returncode != 0
    assert named in result.stdout + result.stderr

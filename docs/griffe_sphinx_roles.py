"""Griffe extension for the docs build: render the Sphinx markup the docstrings use as Markdown.

The docstrings are Google style, but some use Sphinx roles (``:class:`~gradstats.x.Y```) and
reStructuredText literal-block markers (``Example::``). mkdocstrings renders Markdown, where a
role would show as ``:class:`` followed by code. This extension rewrites, in every docstring it
loads (never in the source files):

* ``:role:`~a.b.Name``` -> ```Name```, ``:role:`a.b.Name``` -> ```a.b.Name```,
  ``:role:`text <target>``` -> ```text``` (inline code: a role is a name, not a link, so a
  docstring can never break the build with a cross-reference);
* an ``Args:`` entry whose list of names wraps (``a, b, c,`` then a deeper-indented
  ``d, e: text``) -> one line, as the Google parser expects;
* a reStructuredText literal block (a line ending in ``::``, outside doctest lines, then an
  indented block) -> the line ending in ``:`` and the block as a fenced code block at the line's
  indentation; ``Example::`` becomes ``For example:`` (``Example:`` would open a Google section).

Loaded from mkdocs.yml: ``extensions: [docs/griffe_sphinx_roles.py:SphinxRoles]``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?[a-z]+:`(?P<body>[^`]+)`")
WRAPPED_NAMES = re.compile(r"\s*\w+(?:,\s*\w+)*,")


def _role_text(match: re.Match[str]) -> str:
    body = match.group("body").strip()
    explicit = re.fullmatch(r"(?P<text>.+?)\s*<[^>]+>", body)
    if explicit:
        body = explicit.group("text")
    elif body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    return f"`{body}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_marker(line: str) -> str:
    """``Text::`` -> ``Text:``; ``Example::`` -> ``For example:``; a bare ``::`` -> ``""``."""
    head = line.rstrip()[:-2].rstrip()
    if not head.strip():
        return ""
    if head.strip() in ("Example", "Examples"):
        return " " * _indent(line) + "For example:"
    return head + ":"


def convert(text: str) -> str:
    """Rewrite Sphinx roles and reStructuredText literal blocks in ``text`` as Markdown."""
    lines: list[str] = []
    for line in ROLE.sub(_role_text, text).splitlines():
        previous = lines[-1] if lines else ""
        if WRAPPED_NAMES.fullmatch(previous) and line.strip() and _indent(line) > _indent(previous):
            lines[-1] = f"{previous} {line.strip()}"
        else:
            lines.append(line)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not (stripped.endswith("::") and not stripped.startswith((">>>", "..."))):
            out.append(line)
            i += 1
            continue
        margin = _indent(line)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block_end = j
        while block_end < len(lines) and (
            not lines[block_end].strip() or _indent(lines[block_end]) > margin
        ):
            block_end += 1
        while block_end > j and not lines[block_end - 1].strip():
            block_end -= 1
        block = lines[j:block_end]
        out.append(_literal_marker(line))
        if block:
            depth = min(_indent(b) for b in block if b.strip())
            pad = " " * margin
            out.extend(["", pad + "```"])
            out.extend(pad + b[depth:] if b.strip() else "" for b in block)
            out.extend([pad + "```", ""])
        i = block_end
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Apply :func:`convert` to each object's docstring as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)

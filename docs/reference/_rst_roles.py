"""A griffe extension for the API reference (mkdocs.yml, mkdocstrings' ``extensions``).

mc2-emu's docstrings are free-form text with two reStructuredText habits that Markdown does not
know: cross-reference roles (``:class:`World```, ``:mod:`emu.npu.tensor```, ``:meth:`~World.run```)
and a paragraph ending in ``::`` before an indented example.  This extension rewrites them in the
loaded docstrings only (the source is not touched): a role becomes a code span of its target (with
``~``: of the target's last component), and ``::`` at the end of a line becomes ``:``.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|data|attr|exc|obj|const):`(~?)([^`]+)`")
LITERAL_INTRO = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _role(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown(text: str) -> str:
    """``text`` with the reStructuredText roles and literal-block markers made Markdown."""
    return LITERAL_INTRO.sub(":", ROLE.sub(_role, text))


class RstRoles(griffe.Extension):
    """Rewrite every loaded docstring with :func:`markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)

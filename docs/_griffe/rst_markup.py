"""A griffe extension for the docs build: the library's docstrings use a few reST spellings
(``Example:`` sections, ``:math:`` / ``:func:`` roles, ``.. math::`` and ``.. code-block::``
directives) that pytest's doctests and IDEs read well; this rewrites them into what
mkdocstrings' Google-style parser and Markdown render: an ``Examples:`` section (rendered as a
``pycon`` code block), arithmatex ``$...$`` / ``$$...$$`` maths, inline code for roles, and fenced
code blocks. The source files stay as they are."""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_OBJ_ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<kind>math|code-block)::[ \t]*(?P<arg>\S*)[ \t]*\n")


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1] if target.startswith("functrain.") else target


def _directives(text: str) -> str:
    """``.. math::`` and ``.. code-block:: lang`` with an indented body -> ``$$`` / fenced blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i] + "\n")
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        depth = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        body = [b[depth:] for b in body]
        if match["kind"] == "math":
            out += ["", f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""]
        else:
            out += ["", f"{indent}```{match['arg'] or 'text'}", *(f"{indent}{b}" for b in body), f"{indent}```", ""]
    return "\n".join(out)


def to_markdown(text: str) -> str:
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _MATH_ROLE.sub(lambda m: f"${m[1]}$", text)
    text = _OBJ_ROLE.sub(lambda m: f"`{_short(m[1])}`", text)
    return _directives(text)


class RstMarkup(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)

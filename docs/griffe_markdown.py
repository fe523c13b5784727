"""Griffe extension used by the docs build only: render mechicl's docstrings as Markdown.

mechicl's docstrings are Google style, with a few reStructuredText habits that mkdocstrings'
Markdown rendering does not understand. This extension rewrites the docstring text when the
docs are built. The source files are not touched. It makes three changes:

* Sphinx roles such as ``:func:`x` ``, ``:class:`x` ``, ``:meth:`~a.b.c` ``, ``:data:``,
  ``:mod:`` and ``:attr:`` become inline code (`x`, or `c` for a ``~`` target, as Sphinx shows it).
* Doctest blocks (``>>>`` lines with their output, up to a blank line) become fenced ``pycon``
  code blocks, with ``# doctest:`` flags removed. Without this they render as nested
  blockquotes, and output such as ``[0, 7, 9]`` after ``["input_ids"]`` parses as a Markdown
  reference link, which fails the strict build. Blocks inside an ``Examples:`` section are
  left alone, because Griffe parses those itself.
* A Google-style argument entry that documents several parameters at once (``zmin, zmax: ...``,
  also with ``*args`` / ``**kwargs`` among them) becomes one entry per parameter with the same
  text. Griffe would otherwise warn that the
  parameter ``"zmin, zmax"`` is not in the signature, which also fails the strict build.

Loaded from ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|mod|attr|obj|exc|const):`(~?)([^`]+)`")
_DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:.*$")
_ARGS_HEADER = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments):\s*$")
_EXAMPLES_HEADER = re.compile(r"^(\s*)Examples:\s*$")
_MULTI_NAME = re.compile(r"^(\s*)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _rewrite(text: str) -> str:
    lines = _ROLE.sub(_role, text).split("\n")
    out: list[str] = []
    in_fence = False
    examples_indent: int | None = None  # inside an "Examples:" section at this indentation
    args_indent: int | None = None  # inside an "Args:" section at this indentation
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        if stripped:  # a non-blank line at or left of a section header ends that section
            if examples_indent is not None and _indent(line) <= examples_indent:
                examples_indent = None
            if args_indent is not None and _indent(line) <= args_indent:
                args_indent = None
        if match := _EXAMPLES_HEADER.match(line):
            examples_indent = len(match.group(1))
        elif match := _ARGS_HEADER.match(line):
            args_indent = len(match.group(1))
        elif stripped.startswith(">>>") and examples_indent is None:
            indent = line[: _indent(line)]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= len(indent):
                out.append(_DOCTEST_FLAGS.sub("", lines[i]) if ">>>" in lines[i] else lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        elif args_indent is not None and (match := _MULTI_NAME.match(line)):
            lead, names, rest = match.groups()
            block_end = i + 1
            while (block_end < len(lines) and lines[block_end].strip()
                   and _indent(lines[block_end]) > len(lead)):
                block_end += 1
            continuation = lines[i + 1 : block_end]
            for name in (n.strip() for n in names.split(",")):
                out.append(f"{lead}{name}:{rest}")
                out.extend(continuation)
            i = block_end
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Rewrite every docstring's text before it is parsed and rendered."""

    def on_object(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value)

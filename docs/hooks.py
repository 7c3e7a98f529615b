"""MkDocs hook: render the library's docstrings, written for ``pydoc`` and doctest,
as good Markdown.

* A doctest session (``>>>`` lines and their output) becomes a ``pycon`` code block
  (Markdown would otherwise read ``>>>`` as nested block quotes).
* Sphinx roles such as ``:func:`filter``` become plain code spans, and a reST
  ``.. code-block:: python`` directive a fenced code block.

The same Markdown extensions render the pages and, through mkdocstrings, the
docstrings, so adding the extension in ``on_config`` covers both.
"""

from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor

CODE_BLOCK = re.compile(r"^(\s*)\.\. code-block::\s*(\w*)\s*$")
ROLE = re.compile(r":(?:func|class|meth|mod|attr|exc|data|obj|py:\w+):`~?([^`]+)`")
FENCE = re.compile(r"^\s*(```|~~~)")


def rest_code_blocks(lines: list[str]) -> list[str]:
    """``.. code-block:: python`` and its indented body -> a fenced block."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = CODE_BLOCK.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, lang = m.group(1), m.group(2) or "text"
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        width = min(len(b) - len(b.lstrip()) for b in body if b.strip()) if body else 0
        out.extend([f"{indent}```{lang}", *(indent + b[width:] for b in body),
                    f"{indent}```", ""])
    return out


class DoctestBlocks(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        lines = rest_code_blocks(lines)
        out: list[str] = []
        in_fence = False
        session: list[str] | None = None
        indent = ""
        for line in lines:
            if session is not None:
                if line.strip() and line.startswith(indent):
                    session.append(line[len(indent):])
                    continue
                out.extend([f"{indent}```pycon", *(indent + s for s in session),
                            f"{indent}```"])
                session = None
            if FENCE.match(line):
                in_fence = not in_fence
                out.append(line)
                continue
            if not in_fence and line.lstrip().startswith(">>>"):
                indent = line[: len(line) - len(line.lstrip())]
                if out and out[-1].strip():
                    out.append("")
                session = [line[len(indent):]]
                continue
            out.append(line if in_fence else ROLE.sub(r"`\1`", line))
        if session is not None:
            out.extend([f"{indent}```pycon", *(indent + s for s in session), f"{indent}```"])
        return out


class DocstringMarkdown(Extension):
    def extendMarkdown(self, md):  # noqa: N802 - Markdown's API
        # after whitespace normalisation (30), before fenced code blocks (25)
        md.preprocessors.register(DoctestBlocks(md), "nanostream_doctest", 28)


def on_config(config, **kwargs):
    config.markdown_extensions.append(DocstringMarkdown())
    return config

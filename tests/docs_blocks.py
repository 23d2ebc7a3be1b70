"""Find the code blocks of a reStructuredText file, and how each one is tested.

The rule of the documentation (enforced by tests/test_docs.py): every code
block in README.rst, CHANGES.rst, examples/README.rst and docs/*.rst either
runs in a test, or is marked as not runnable for a stated reason.

- A ``.. code-block:: python`` block with no marker is *run*: tests/docs_runner.py
  executes the runnable blocks of a file in order, in one namespace, against
  the docs' line server (tests/docs_server.py), with its port in place of 2485.
- A ``.. literalinclude::`` of a script in ``examples/`` is run by
  tests/test_examples.py.
- Any other block (``console``, ``text``, a ``::`` literal block, ``>>>``...) and
  any python block that cannot run here needs a reST comment right before it,
  with only blank lines in between:

  - ``.. not-runnable: <reason>``, e.g. ``.. not-runnable: needs AWS credentials``;
  - ``.. tested-by: tests/test_x.py::test_name``: the block is run by that test.

A page whose code must run under ``gevent.monkey.patch_all()`` (as in a
gunicorn gevent worker) says so with the comment ``.. docs-test: monkey-patch``.

This module uses only the standard library, so that the runner can read a
page before it decides whether to monkey-patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent

CODE_DIRECTIVES = ("code-block", "code", "sourcecode")
OTHER_DIRECTIVES = ("literalinclude", "doctest", "testcode", "testsetup", "testoutput", "ipython")
PYTHON = ("python", "python3", "py")
PLACEHOLDER_PORT = "2485"

_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>[\w-]+)::\s*(?P<argument>.*)$")
_MARKER = re.compile(r"^\s*\.\.\s+(?P<kind>not-runnable|tested-by):\s*(?P<value>.*?)\s*$")
_PAGE_OPTION = re.compile(r"^\.\.\s+docs-test:\s*(?P<value>.+?)\s*$", re.M)


@dataclass
class Block:
    """One code block of a file."""

    path: Path
    line: int  # 1-based line of the directive (or of the ``::`` paragraph)
    kind: str  # a directive name, "literal" for ``::`` blocks, "doctest" for ``>>>`` paragraphs
    language: str
    code: str
    marker: Optional[Tuple[str, str]]  # ("not-runnable", reason) or ("tested-by", reference)

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"

    @property
    def runs_here(self) -> bool:
        """Whether tests/docs_runner.py executes this block."""
        return self.marker is None and self.kind in CODE_DIRECTIVES and self.language in PYTHON


def page_options(text: str) -> List[str]:
    """The ``.. docs-test: ...`` options of a page, such as ``monkey-patch``."""
    return [match.group("value") for match in _PAGE_OPTION.finditer(text)]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _body(lines: List[str], start: int, indent: int) -> Tuple[List[str], int]:
    """The lines after ``start`` indented deeper than ``indent`` (blanks included), and the next index."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    body = lines[start:end]
    while body and not body[-1].strip():
        body.pop()
    return body, end


def _dedent(body: List[str]) -> str:
    indents = [_indent(line) for line in body if line.strip()]
    cut = min(indents) if indents else 0
    return "\n".join(line[cut:] for line in body).strip("\n") + "\n"


def _marker_before(lines: List[str], index: int) -> Optional[Tuple[str, str]]:
    """The marker comment right before line ``index``, with only blank lines in between."""
    i = index - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    if i < 0:
        return None
    match = _MARKER.match(lines[i])
    return (match.group("kind"), match.group("value")) if match else None


def find_blocks(path: Path) -> List[Block]:
    """Every code block of the reST file at ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        if directive and directive.group("name") in CODE_DIRECTIVES + OTHER_DIRECTIVES:
            indent = len(directive.group("indent"))
            body, end = _body(lines, i + 1, indent)
            content = list(body)
            while content and (re.match(r"^\s*:[\w-]+:", content[0]) or not content[0].strip()):
                content.pop(0)  # the directive's options
            name = directive.group("name")
            argument = directive.group("argument").strip()
            language = argument if name in CODE_DIRECTIVES else name
            code = argument if name == "literalinclude" else _dedent(content)
            blocks.append(Block(path, i + 1, name, language or "default", code, _marker_before(lines, i)))
            i = end
            continue
        stripped = line.strip()
        if stripped.endswith("::") and not stripped.startswith(".."):
            body, end = _body(lines, i + 1, _indent(line))
            if any(b.strip() for b in body):
                start = i  # the marker goes before the paragraph that ends with "::"
                while start > 0 and lines[start - 1].strip() and _indent(lines[start - 1]) == _indent(line):
                    start -= 1
                marker = _marker_before(lines, start)
                blocks.append(Block(path, i + 1, "literal", "default", _dedent(body), marker))
                i = end
                continue
        if stripped.startswith(">>>"):
            start = i
            while i < len(lines) and lines[i].strip():
                i += 1
            blocks.append(
                Block(
                    path,
                    start + 1,
                    "doctest",
                    "pycon",
                    "\n".join(lines[start:i]),
                    _marker_before(lines, start),
                )
            )
            continue
        i += 1
    return blocks


def documentation_files() -> List[Path]:
    """The files whose code blocks must run or be marked."""
    files = [ROOT / "README.rst", ROOT / "CHANGES.rst", ROOT / "examples" / "README.rst"]
    files += sorted((ROOT / "docs").glob("*.rst"))
    return [f for f in files if f.exists()]

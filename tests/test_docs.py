"""Every code block of README.rst, CHANGES.rst, examples/README.rst and docs/*.rst runs, or says why not.

The rules are in tests/docs_blocks.py: unmarked python blocks are executed by
tests/docs_runner.py against the docs' line server; literalincludes of
examples are run by tests/test_examples.py; anything else carries a
``.. not-runnable: <reason>`` or ``.. tested-by: tests/<file>::<test>`` comment.
"""

from __future__ import annotations

import ast
import collections
import os
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from docs_blocks import ROOT, documentation_files, find_blocks, page_options
from gevent import subprocess
from helpers import starting_a_program

import geventconnpool

FILES = documentation_files()
IDS = [str(path.relative_to(ROOT)) for path in FILES]
RUNNER = Path(__file__).resolve().parent / "docs_runner.py"
EXAMPLE_TESTS = (Path(__file__).resolve().parent / "test_examples.py").read_text()


def problems_of(path: Path) -> list:
    """The blocks of ``path`` that neither run in a test nor are marked, each with what is wrong."""
    found = []
    for block in find_blocks(path):
        if block.marker is not None:
            kind, value = block.marker
            if kind == "not-runnable" and len(value.split()) < 2:
                found.append(f"{block.where}: '.. not-runnable:' needs a stated reason, not {value!r}")
            if kind == "tested-by":
                test_file, _, test_name = value.partition("::")
                test_path = ROOT / test_file
                if not test_path.is_file() or f"def {test_name}(" not in test_path.read_text():
                    found.append(f"{block.where}: '.. tested-by: {value}' names no existing test")
            continue
        if block.runs_here:
            continue
        if block.kind == "literalinclude":
            target = (path.parent / block.code).resolve()
            if target.parent == ROOT / "examples" and f'run_example("{target.name}"' in EXAMPLE_TESTS:
                if not target.is_file():
                    found.append(f"{block.where}: literalinclude of a missing file {block.code}")
                continue
        found.append(
            f"{block.where}: a {block.kind} block ({block.language}) that no test runs: run it, or mark it"
            " with '.. not-runnable: <reason>' or '.. tested-by: tests/<file>::<test>'"
        )
    return found


def nothing_to_run(path: Path) -> str:
    """Why the docs runner has nothing of ``path`` to run: the page, by its path, and what its blocks are."""
    name = path.relative_to(ROOT)
    blocks = find_blocks(path)
    if not blocks:
        return f"{name} has no code block"
    kinds = collections.Counter(
        f"marked {block.marker[0]}" if block.marker else f"{block.kind} ({block.language})"
        for block in blocks
    )
    return f"{name} has no unmarked python block to run; its blocks: " + ", ".join(
        f"{count} {kind}" for kind, count in sorted(kinds.items())
    )


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_every_block_runs_in_a_test_or_is_marked_not_runnable(path):
    """No code block is left unchecked: each one runs, or carries a marker with a reason."""
    assert problems_of(path) == []


@pytest.mark.watchdog(200)
@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_the_runnable_blocks_of_the_file_run(path):
    """The file's unmarked python blocks run in order against a loopback server, and leave no pool behind."""
    runnable = [block for block in find_blocks(path) if block.runs_here]
    if not runnable:
        pytest.skip(nothing_to_run(path))
    env = dict(os.environ)
    with starting_a_program():
        result = subprocess.run(
            [sys.executable, str(RUNNER), str(path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=180,
            check=False,
        )
    output = result.stdout.decode()
    assert result.returncode == 0, output
    assert f"all {len(runnable)} blocks ran" in output, output
    for block in runnable:
        assert f"ran {block.where}\n" in output


def test_a_page_with_nothing_to_run_is_skipped_with_its_path_and_what_its_blocks_are():
    """The skip of a page without runnable blocks names it by its path from the repository's root (so
    README.rst is the root's, which runs) and says what its blocks are instead."""
    quiet = [path for path in FILES if not any(block.runs_here for block in find_blocks(path))]
    assert ROOT / "examples" / "README.rst" in quiet
    for path in quiet:
        with pytest.raises(pytest.skip.Exception) as skipped:
            test_the_runnable_blocks_of_the_file_run(path)
        reason = str(skipped.value)
        assert ROOT / reason.split()[0] == path, reason
        blocks = find_blocks(path)
        assert reason.endswith(" has no code block") if not blocks else f"{len(blocks)} " in reason, reason


# The development tools a page may tell readers to run, and the package that installs each one.
TOOLS = {"tox": "tox", "sphinx-build": "sphinx", "pytest": "pytest", "ruff": "ruff", "mypy": "mypy",
         "twine": "twine", "build": "build"}  # fmt: skip
TOOL_COMMAND = re.compile(
    r"(?:``|^\s*\$ )(?:python3? -m )?(tox|sphinx-build|pytest|ruff|mypy|twine|build)\b", re.M
)


def what_extras_install() -> dict:
    """Each extra of the installed geventconnpool and the names of the packages it installs."""
    extras: dict = collections.defaultdict(set)
    for line in metadata.requires("geventconnpool") or []:
        found = re.match(r"([\w.-]+).*extra == \"(\w+)\"", line)
        if found:
            extras[found.group(2)].add(found.group(1).lower())
    return extras


def installed_by(paragraph: str) -> set:
    """The packages that the ``pip install`` commands of ``paragraph`` install, extras included."""
    packages = set()
    for command in re.findall(r"pip install ([^`\n]+)", paragraph):
        for word in command.split():
            extras = re.search(r"\[([\w,]+)\]", word)
            if extras:
                packages |= {p for extra in extras.group(1).split(",") for p in what_extras_install()[extra]}
            elif not word.startswith(("-", "&")):
                packages.add(word.strip("'\"").lower())
    return packages


def test_each_documented_command_installs_or_names_what_it_runs():
    """A paragraph or block of the docs that runs tox, pytest, Sphinx, ruff, mypy, build or twine also
    installs it, or names the pip install (an extra counts) that does."""
    pages = [*FILES, ROOT / "examples" / "gunicorn_app" / "README.rst", ROOT / "benchmarks" / "README.rst"]
    texts = {path: path.read_text() for path in pages}
    texts[ROOT / "docs" / "conf.py"] = ast.get_docstring(ast.parse((ROOT / "docs" / "conf.py").read_text()))
    missing = []
    for path, text in texts.items():
        for paragraph in re.split(r"\n\s*\n|\n(?=\s*[-*] )", text):  # blank lines, or a list's next item
            for tool in TOOL_COMMAND.findall(paragraph):
                if TOOLS[tool] not in installed_by(paragraph):
                    missing.append(f"{path.relative_to(ROOT)}: {tool} in {paragraph.strip()[:70]!r}...")
    assert not missing, "\n".join(missing)


def test_placeholder_pages_and_the_toctree():
    """The index lists every page of docs/, reliability and performance included."""
    index = (ROOT / "docs" / "index.rst").read_text()
    toctree = index[index.index(".. toctree::") :]
    for page in sorted((ROOT / "docs").glob("*.rst")):
        if page.stem != "index":
            assert re.search(rf"^\s+{page.stem}$", toctree, re.M), f"{page.stem} is not in the toctree"


def test_readme_keeps_the_two_commands_of_try_it():
    """README's "Try it" keeps the demo and the test-suite commands exactly as users copy them."""
    readme = (ROOT / "README.rst").read_text()
    section = readme[readme.index("Try it\n------") : readme.index("Usage\n-----")]
    assert "    $ python -m pip install -e .\n    $ python examples/demo.py\n" in section
    assert "    $ python3 -m pip install tox && python3 -m tox\n" in section


def test_docs_name_no_remote_host_outside_blocks_marked_not_runnable():
    """Runnable blocks only use loopback addresses; test.example.org appears only in marked blocks."""
    for path in FILES:
        for block in find_blocks(path):
            if block.runs_here:
                hosts = set(re.findall(r"[\"']([\w.-]+\.(?:org|com|net|io))[\"']", block.code))
                assert not hosts, f"{block.where} runs against {hosts}"


def test_the_changelog_has_an_entry_for_this_version():
    """CHANGES.rst has an entry for the package's version, which the docs' changelog page includes."""
    changes = (ROOT / "CHANGES.rst").read_text()
    assert re.search(rf"^{re.escape(geventconnpool.__version__)}\n-+$", changes, re.M)
    assert ".. include:: ../CHANGES.rst" in (ROOT / "docs" / "changelog.rst").read_text()


def test_every_public_name_is_in_the_api_reference():
    """docs/api.rst documents every name of geventconnpool.__all__."""
    api = (ROOT / "docs" / "api.rst").read_text()
    for name in geventconnpool.__all__:
        assert re.search(rf"(auto\w+|data)::\s+(geventconnpool\.)?{re.escape(name)}\s*$", api, re.M), name


def test_the_checker_flags_unmarked_blocks_and_accepts_marked_ones(tmp_path):
    """The block finder sees console, literal and >>> blocks, and markers only count right before a block."""
    page = tmp_path / "page.rst"
    page.write_text(
        textwrap.dedent(
            """\
            Title
            =====

            .. docs-test: monkey-patch

            .. code-block:: console

                $ unmarked

            .. not-runnable: needs AWS credentials

            .. code-block:: python

                import boto3

            A literal block::

                raw text

            .. not-runnable: shown for its output only

            A marked literal block, whose paragraph
            spans two lines::

                raw text

            >>> 1 + 1
            2

            .. tested-by: tests/test_docs.py::test_the_checker_flags_unmarked_blocks_and_accepts_marked_ones

            .. code-block:: text

                checked elsewhere

            .. not-runnable: x

            .. code-block:: python
               :caption: runs

               print("hello")
            """
        )
    )
    blocks = find_blocks(page)
    assert [(b.kind, b.language, b.runs_here) for b in blocks] == [
        ("code-block", "console", False),
        ("code-block", "python", False),
        ("literal", "default", False),
        ("literal", "default", False),
        ("doctest", "pycon", False),
        ("code-block", "text", False),
        ("code-block", "python", False),
    ]
    assert blocks[-1].code == 'print("hello")\n'
    assert page_options(page.read_text()) == ["monkey-patch"]
    problems = problems_of(page)
    assert [p.split(":")[1] for p in problems] == ["6", "16", "27", "38"]
    assert "needs a stated reason" in problems[-1]

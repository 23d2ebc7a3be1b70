"""toxfile.py, the project's tox plugin: the README's ``python3 -m tox`` finds every installed Python.

Each test runs the real tox, from this environment, on a small project in a
temporary directory that has this repository's toxfile.py and the Python
factors of its envlist; it creates a virtualenv per Python, so it is slow.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Set

import pytest
from gevent import subprocess

ROOT = Path(__file__).resolve().parent.parent
MINORS = (9, 10, 11, 12, 13)  # tox.ini's py3{9,10,11,12,13} factors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("tox") is None, reason="tox is not installed here (the tox env soak has it)"
    ),
]


def clean_env() -> dict:
    """This process's environment without what a tox run or an activated virtualenv adds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOX_") and k != "VIRTUAL_ENV"}
    env.pop("PYENV_VERSION", None)  # as in a shell where pyenv selects the default Python only
    return env


def pythons_on_this_machine(env: dict) -> Set[str]:
    """The versions 3.9 to 3.13 a person finds: ``pyenv versions``, and ``python3.X`` on PATH if it runs."""
    found = set()
    if shutil.which("pyenv", path=env.get("PATH")):
        listed = subprocess.run(["pyenv", "versions", "--bare"], env=env, stdout=subprocess.PIPE, check=True)
        found |= {
            ".".join(v.split(".")[:2]) for v in listed.stdout.decode().split() if re.match(r"3\.\d+\.\d+$", v)
        }
    for minor in MINORS:
        program = shutil.which(f"python3.{minor}", path=env.get("PATH"))
        if program and subprocess.run([program, "-c", ""], env=env, capture_output=True).returncode == 0:
            found.add(f"3.{minor}")
    return found & {f"3.{m}" for m in MINORS}


@pytest.mark.watchdog(300)
def test_tox_tests_every_installed_python_and_ends_with_a_line_naming_them(tmp_path):
    """python3 -m tox runs an environment on every Python 3.9-3.13 installed on PATH or by pyenv, and its last
    line names the Pythons it tested and the ones it did not find."""
    shutil.copy(ROOT / "toxfile.py", tmp_path)
    (tmp_path / "tox.ini").write_text(
        textwrap.dedent(
            """\
            [tox]
            envlist = py3{9,10,11,12,13}, py30
            skip_missing_interpreters = true

            [testenv]
            skip_install = true
            commands = python -c "import sys; print('running on', sys.version.split()[0])"
            """
        )
    )
    env = clean_env()
    installed = pythons_on_this_machine(env)
    assert installed, "no Python 3.9-3.13 on this machine at all"

    result = subprocess.run(
        [sys.executable, "-m", "tox", "--workdir", str(tmp_path / ".tox")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=240,
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output
    for minor in MINORS:
        version = f"3.{minor}"
        state = "OK" if version in installed else "SKIP"
        assert re.search(rf"^  py3{minor}: {state} ", output, re.M), f"py3{minor} not {state}:\n{output}"
    last = output.rstrip().splitlines()[-1]
    match = re.fullmatch(r"Pythons tested: (.*); not found: (.*)", last)
    assert match, output
    assert {".".join(v.split(".")[:2]) for v in match.group(1).split(", ")} == installed, last
    assert match.group(2).split(", ") == [
        *sorted(f"3.{m}" for m in MINORS if f"3.{m}" not in installed),
        "3.0",
    ]

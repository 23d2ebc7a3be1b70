"""This project's tox plugin; tox loads a ``toxfile.py`` beside ``tox.ini`` by itself.

It does two things for ``python3 -m tox``:

- It finds the Pythons that pyenv installed, as well as those on ``PATH``:
  tox tries the newest CPython of each minor version under pyenv's
  ``versions`` directory first (tox's own ``--discover``).  pyenv's shims
  alone do not do it: ``python3.9`` is a shim that fails unless 3.9 is the
  selected version.
- The run ends with one line naming the Pythons it tested and the ones it
  did not find, because tox's own report only says "SKIP" for an
  environment whose Python is missing.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
from pathlib import Path
from typing import Dict, List, Set, Tuple

from tox.config.sets import ConfigSet
from tox.plugin import impl
from tox.session.state import State
from tox.tox_env.api import ToxEnv
from tox.tox_env.python.api import Python

_VERSION_DIR = re.compile(r"(\d+)\.(\d+)\.(\d+)\Z")  # a CPython; not pypy-*, miniconda*, a virtualenv's name
# setup.py's python_requires; older ones are no use here, and one too old for tox to ask its version (2.7)
# would end tox's search for every environment.
OLDEST = (3, 9)


def pyenv_pythons() -> List[str]:
    """The executable of the newest CPython of each minor version that pyenv installed, oldest first."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    newest: Dict[Tuple[int, ...], Tuple[int, ...]] = {}  # (3, 9): (3, 9, 18)
    for entry in sorted((root / "versions").glob("*")):
        match = _VERSION_DIR.match(entry.name)
        executable = entry / "bin" / "python"
        version = tuple(int(part) for part in match.groups()) if match else ()
        if version >= OLDEST and executable.exists():
            newest[version[:2]] = max(newest.get(version[:2], version), version)
    return [
        str(root / "versions" / ".".join(map(str, v)) / "bin" / "python") for _, v in sorted(newest.items())
    ]


@impl
def tox_add_core_config(core_conf: ConfigSet, state: State) -> None:
    """Let tox try pyenv's Pythons first, after those given with ``--discover``, before ``PATH``."""
    options = state.conf.options
    if hasattr(options, "discover"):  # the commands that create environments
        options.discover = [*options.discover, *(p for p in pyenv_pythons() if p not in options.discover)]


class _Summary:
    """The Pythons the environments of this run used and those they did not find, for one line at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # tox -p runs environments in threads
        self.tested: Set[str] = set()  # "3.9.18"
        self.missing: Set[str] = set()  # "3.14", or a base_python spec as it is written

    def tested_with(self, tox_env: Python) -> None:
        version = ".".join(map(str, tox_env.base_python.version_info[:3]))
        with self._lock:
            self.tested.add(version)

    def torn_down(self, tox_env: Python) -> None:
        try:
            tox_env.base_python  # noqa: B018 (searched already: this reads the result)
        except Exception:  # tox's Skip or NoInterpreter: none of its base_python specs found
            with self._lock:
                self.missing.update(_readable(spec) for spec in tox_env.conf["base_python"])

    def line(self) -> str:
        found = {version.rsplit(".", 1)[0] for version in self.tested}
        tested = ", ".join(sorted(self.tested, key=_version_key)) or "none"
        missing = ", ".join(sorted(self.missing - found, key=_version_key)) or "none"
        return f"Pythons tested: {tested}; not found: {missing}"

    def print_at_exit(self) -> None:
        if self.tested or self.missing:
            print(self.line(), flush=True)


def _readable(spec: str) -> str:
    """``py39``, ``py3.9``, ``python3.9`` as ``3.9``; any other spec as it is."""
    match = re.fullmatch(r"(?:py|python)?(\d)\.?(\d+)", spec)
    return f"{match.group(1)}.{match.group(2)}" if match else spec


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


SUMMARY = _Summary()
atexit.register(SUMMARY.print_at_exit)  # after tox's own report of each environment


@impl
def tox_before_run_commands(tox_env: ToxEnv) -> None:
    """Note the Python of an environment that runs its commands."""
    if isinstance(tox_env, Python):
        SUMMARY.tested_with(tox_env)


@impl
def tox_env_teardown(tox_env: ToxEnv) -> None:
    """Note the Pythons that an environment looked for and did not find."""
    if isinstance(tox_env, Python) and not tox_env.conf.name.startswith("."):  # not a packaging env
        SUMMARY.torn_down(tox_env)

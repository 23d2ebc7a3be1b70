"""Running a real server program (nginx, haproxy) as the test's subprocess, and making sure it ends.

:class:`ServerProcess` runs a program in the foreground, in a session (so a
process group) of its own, from files in a scratch directory, with its output
in a log file there.  :meth:`ServerProcess.stop` ends it and, if it does not
exit in time, kills its whole group, so that no worker is left behind even
when the test fails half-way; :meth:`ServerProcess.cleanup` also removes the
directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import gevent
from gevent import subprocess
from helpers import starting_a_program
from redis_server import free_port


def start_process(args: List[str], log: Path) -> subprocess.Popen:
    """Start ``args`` in a new session, its stdout and stderr appended to ``log``."""
    with open(log, "ab") as output, starting_a_program():
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def end_process(process: subprocess.Popen, signum: int, timeout: float = 10.0) -> None:
    """Send ``signum`` to the process and wait for it; after ``timeout`` s, kill its whole group."""
    if process.poll() is None:
        try:
            process.send_signal(signum)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
        # Still running (so not reaped): its pid is still its group's id.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def log_tail(log: Path, lines: int = 20) -> str:
    """The last lines of a log file, to put in an error message."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


class ServerProcess:
    """A server program listening on 127.0.0.1:``port``, run by the test; subclasses say how.

    A subclass writes its files into :attr:`dir` and overrides :meth:`command`
    and :meth:`ready`.
    """

    #: the program's name, in messages and in the scratch directory's name
    name = "server"

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"geventconnpool-{self.name}-"))
        self.log = self.dir / "output.log"  #: what the program prints
        self._process: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server serves (called until it does, or until start() gives up)."""
        raise NotImplementedError

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it is :meth:`ready`."""
        assert not self.running, f"{self.name} is already running"
        self._process = start_process(self.command(), self.log)
        try:
            self.wait_until(self.ready, f"{self.name} serving", timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server at once (SIGTERM) and wait for it to exit."""
        process, self._process = self._process, None
        if process is not None:
            end_process(process, signal.SIGTERM)

    def cleanup(self) -> None:
        """Stop the server and remove its scratch directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, args: List[str], timeout: float = 10.0) -> None:
        """Run a command for the server (such as ``nginx -s reload``) to its end; RuntimeError if it fails."""
        process = start_process(args, self.log)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_process(process, signal.SIGKILL)
            raise RuntimeError(f"{args} did not finish within {timeout} s\n{log_tail(self.log)}") from None
        if returncode != 0:
            raise RuntimeError(f"{args} exited with {returncode}\n{log_tail(self.log)}")

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Wait until ``condition()``; RuntimeError, with the log, if the server exits or time runs out."""
        process = self._process
        assert process is not None, f"{self.name} is not running"
        deadline = time.monotonic() + timeout
        while not condition():
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}\n{log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout} s\n{log_tail(self.log)}")
            gevent.sleep(0.02)
